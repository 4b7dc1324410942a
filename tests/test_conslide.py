"""ConSlide (strategies/conslide.py): the region reservoir, regions from coordinates, the
pseudo-bags, the weighted replay loss, and a short 2-task run through ``strategy.train``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin
from clbench.scenarios.bags import Bags, MILStream, mil_scenario
from clbench.strategies.conslide import ConSlide, ConSlideConfig, RegionBuffer, slide_regions

from clbench.backbones.mil import ABMILConfig, abmil
from clbench.errors import ConfigError
from clbench.registry import STRATEGIES

D = 8


def _strategy(n_classes: int = 0, dropout: float = 0.25, **cfg: Any) -> ConSlide:
    torch.manual_seed(0)
    names = [f"c{i}" for i in range(4)]
    model = abmil(ABMILConfig(in_dim=D, hidden=16, attn_dim=8, dropout=dropout)).classifier(names)
    if n_classes:
        model.head.grow(n_classes)
    return ConSlide(
        model=model,
        cfg=ConSlideConfig(**cfg),
        seed=0,
        device="cpu",
        plugins=[],
        in_memory=False,
        n_experiences=2,
    )


def _region(task: int, label: int, rid: int, n: int = 2) -> torch.Tensor:
    """A region whose rows say where they come from: (task, label, region id, noise...)."""
    x = torch.randn(n, D)
    x[:, 0], x[:, 1], x[:, 2] = float(task), float(label), float(rid)
    return x


def test_registered_and_config_checks():
    assert STRATEGIES.get("conslide") is ConSlide
    assert ConSlide.kind == "mil"
    with pytest.raises(ConfigError, match="pseudo_bag_max"):
        ConSlideConfig(pseudo_bag_min=100, pseudo_bag_max=100)
    with pytest.raises(ConfigError, match="region_fraction"):
        ConSlideConfig(region_fraction=0.0)
    with pytest.raises(ConfigError, match="buffer_size"):
        ConSlideConfig(buffer_size=0)
    with pytest.raises(ConfigError, match="replay_weight"):
        ConSlideConfig(replay_weight=-0.1)


def test_reservoir_is_bounded_uniform_and_restorable():
    size, origin = 60, {}
    buf = RegionBuffer(size, seed=3)
    twin = RegionBuffer(size, seed=3)
    offered = 0
    for task in range(4):
        for label in (2 * task, 2 * task + 1):
            for _ in range(30):  # 30 slides of 5 regions per class: 1200 regions in all
                regions = []
                for _ in range(5):
                    origin[offered] = (task, label)
                    regions.append(_region(task, label, offered))
                    offered += 1
                buf.offer(regions, label, task)
                twin.offer(regions, label, task)
                assert len(buf) == min(offered, size)
    # every kept region is one that was offered, with its own label and task, at most once
    ids = [int(r[0, 2]) for r in buf.regions]
    assert len(set(ids)) == size
    assert all(origin[i] == (t, y) for i, t, y in zip(ids, buf.tasks, buf.labels, strict=True))
    # a uniform sample of 1200 regions keeps ~15 per task (a keep-first / keep-last rule
    # would keep 60 of one task and none of the others)
    per_task = torch.bincount(torch.tensor(buf.tasks), minlength=4).tolist()
    assert all(5 <= n <= 25 for n in per_task), per_task
    assert ids == [int(r[0, 2]) for r in twin.regions]  # seeded
    # the state is data and restores the buffer, its reservoir keys and its generator
    restored = RegionBuffer(size, seed=99)
    restored.load_state(buf.state())
    more = [_region(0, 0, 5000 + i) for i in range(40)]
    buf.offer(more, 0, 0)
    restored.offer(more, 0, 0)
    assert [int(r[0, 2]) for r in buf.regions] == [int(r[0, 2]) for r in restored.regions]
    assert restored.labels == buf.labels and restored.tasks == buf.tasks


def test_regions_group_exactly_the_instances_of_a_grid_cell():
    coords = torch.tensor([[0, 0], [150, 20], [99, 99], [100, 0], [250, 260], [10, 50], [120, 90]])
    features = torch.arange(7, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    regions = slide_regions(features, coords, region_size=100, region_instances=64)
    groups = [r[:, 0].long().tolist() for r in regions]
    # cells (0, 0): 0, 2, 5; (1, 0): 1, 3, 6; (2, 2): 4; instances keep their bag order
    assert sorted(groups) == [[0, 2, 5], [1, 3, 6], [4]]
    assert all(
        r.untyped_storage().data_ptr() != features.untyped_storage().data_ptr() for r in regions
    )
    chunks = slide_regions(features, None, region_size=100, region_instances=3)
    assert [c[:, 0].long().tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="coords"):
        slide_regions(features, coords[:5], region_size=100, region_instances=3)
    # a bag without coordinates (a plain dataset of items): chunks; ceil(50% of 3) = 2 kept
    strategy = _strategy(region_instances=3, region_fraction=0.5)
    strategy.store_task([(features.repeat(1, 3)[:, :D], 1, 0)], task=0)
    assert len(strategy.buffer) == 2 and strategy.buffer.labels == [1, 1]
    kept = sorted(r[:, 0].long().tolist() for r in strategy.buffer.regions)
    assert all(k in [[0, 1, 2], [3, 4, 5], [6]] for k in kept) and kept[0] != kept[1]


def test_pseudo_bags_hold_only_buffered_regions_of_their_task_and_class():
    strategy = _strategy()
    strategy.task_classes = [[0, 1], [2, 3]]
    rid = 0
    for task, label, n in [(0, 0, 12), (0, 1, 3), (1, 2, 7), (1, 3, 0)]:
        for _ in range(n):
            strategy.buffer.offer([_region(task, label, rid, n=1 + rid % 3)], label, task)
            rid += 1
    kept = {int(r[0, 2]) for r in strategy.buffer.regions}
    g = torch.Generator().manual_seed(0)
    for task, size, expected in [(0, 5, {0: 5, 1: 3}), (1, 4, {2: 4})]:
        bags = strategy.pseudo_bags(task, size, g)
        assert [y for _, y in bags] == list(expected)  # class 3 has no region: no bag
        for bag, label in bags:
            assert (bag[:, 0] == task).all() and (bag[:, 1] == label).all()
            ids = bag[:, 2].long().unique().tolist()
            assert set(ids) <= kept and len(ids) == expected[label]  # distinct regions
            sizes = {i: 1 + i % 3 for i in ids}  # whole regions: every row of each
            assert bag.shape[0] == sum(sizes.values())


def test_replay_adds_weighted_pseudo_bag_loss_only_after_a_task():
    strategy = _strategy(n_classes=4, dropout=0.0, pseudo_bag_min=50, pseudo_bag_max=60)
    model = strategy.model
    for rid in range(10):  # fewer than pseudo_bag_min: each pseudo-bag takes every region
        label = rid % 2
        strategy.buffer.offer([_region(0, label, rid, n=3)], label, 0)
    x, y = torch.randn(1, 9, D), torch.tensor([2])
    strategy.is_training = True
    strategy.mbatch = [x, y, torch.tensor([1])]
    strategy.mb_output = model(x)
    base = F.cross_entropy(strategy.mb_output, y)

    def loss(weight: float) -> torch.Tensor:
        strategy.cfg.replay_weight = weight
        strategy.replay_generator = torch.Generator().manual_seed(7)
        return strategy.criterion().detach()

    assert torch.allclose(loss(0.5), base)  # no finished task yet: no replay
    strategy.task_classes = [[0, 1]]
    pairs = list(zip(strategy.buffer.regions, strategy.buffer.labels, strict=True))
    replay = sum(
        F.cross_entropy(
            model(torch.cat([r for r, lab in pairs if lab == c])[None]), torch.tensor([c])
        )
        for c in (0, 1)
    )
    assert torch.allclose(loss(0.0), base)
    for w in (0.2, 0.7):
        assert torch.allclose(loss(w), base + w * replay, atol=1e-5)
    strategy.is_training = False  # evaluation losses stay the plain CE
    assert torch.allclose(loss(0.7), base)


def _grid(n: int, patch: int = 256) -> torch.Tensor:
    side = math.ceil(math.sqrt(n))
    i = torch.arange(n)
    return torch.stack([(i % side) * patch, (i // side) * patch], dim=1)


def _bags(classes: tuple[int, ...], per_class: int, g: torch.Generator) -> Bags:
    feats, labels, coords = [], [], []
    for c in classes:
        for _ in range(per_class):
            n = int(torch.randint(10, 20, (1,), generator=g))
            x = torch.randn(n, D, generator=g)
            x[: 1 + n // 5, c] += 3.0  # the planted key instances of class c
            feats.append(x[torch.randperm(n, generator=g)])
            labels.append(c)
            coords.append(_grid(n))
    return Bags(feats, labels, coords=coords)


class LossLog(SupervisedPlugin):
    """Per step: experience, the step's loss and the plain CE of the current bag."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, float, float]] = []

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        ce = F.cross_entropy(strategy.mb_output.detach(), strategy.mb_y)
        exp = int(strategy.experience.current_experience)
        self.rows.append((exp, float(strategy.loss), float(ce)))


def test_two_tasks_train_end_to_end():
    g = torch.Generator().manual_seed(0)
    classes = ((0, 1), (2, 3))
    train = tuple(_bags(c, 6, g) for c in classes)
    test = tuple(_bags(c, 2, g) for c in classes)
    stream = MILStream("new_classes", ("a", "b"), classes, train, test)
    scenario = mil_scenario("tiny", stream, [f"c{i}" for i in range(4)], D)
    strategy = _strategy(epochs=2, region_size=512, pseudo_bag_min=3, pseudo_bag_max=6)
    log = LossLog()
    strategy.plugins.append(log)
    # 2x2 patches of 256 px per 512-px region; a random 20% (rounded up) of each slide's
    expected = sum(
        math.ceil(0.2 * len(torch.unique(train[0].coords(i) // 512, dim=0)))
        for i in range(len(train[0]))
    )
    strategy.train(scenario.train_stream[0])
    assert len(strategy.buffer) == expected
    assert set(strategy.buffer.tasks) == {0} and set(strategy.buffer.labels) == {0, 1}
    assert len({tuple(r.flatten().tolist()) for r in strategy.buffer.regions}) == expected
    strategy.train(scenario.train_stream[1])
    assert strategy.task_classes == [[0, 1], [2, 3]]
    assert set(strategy.buffer.tasks) == {0, 1}
    assert strategy.model.head.num_classes == 4
    first = [(loss, ce) for e, loss, ce in log.rows if e == 0]
    second = [(loss, ce) for e, loss, ce in log.rows if e == 1]
    assert len(first) == len(second) == 2 * 12
    assert all(math.isclose(loss, ce, rel_tol=1e-6) for loss, ce in first)
    assert all(loss > ce + 1e-4 for loss, ce in second)  # + 0.2 x the pseudo-bags' CE
    logits, attention = strategy.bag_outputs(test[0][0][0])
    assert logits.shape == (4,) and attention is not None and torch.isfinite(logits).all()
