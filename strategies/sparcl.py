"""SparCL: sparse continual learning on DER++ (Wang et al., "SparCL: Sparse Continual
Learning on the Edge", NeurIPS 2022; official code github.com/neu-spiral/SparCL).

A class-incremental DER++ learner (:class:`~clbench.strategies.replay.DERpp`) whose
convolutions are sparse from the start and stay sparse, with the paper's three parts as
the official code runs them (``main_sparse_train_w_data_gradient_efficient.py``,
``prune_utils/retrain.py``, ``prune_utils/utils_pr.py``):

- **Task-aware dynamic masking (TDM).** Every convolution of the backbone except the
  ``dense_layers`` (the stem) is masked (:mod:`clbench.adapters.sparse`); the masks start
  at ``sparsity`` by magnitude of the initial weights. At every epoch ``e`` of a task (the
  count restarts at each task) with ``e % update_every_epochs == 0`` each layer is pruned
  to the lower sparsity bound of the epoch's stage, keeping the largest
  ``|w| + prune_grad_weight * |g|`` (``g``: the last mini-batch's gradient, None at the very
  first update), then random inactive positions are regrown, at weight 0, up to the upper
  bound. Stage ``i`` is the number of ``bound_epochs`` reached: the official bounds
  0.75-0.76-0.75 / 0.74-0.75-0.75 at epochs 5-45 prune to 75% and grow to 74% sparsity at
  epoch 0, prune to 76% and grow to 75% at epochs 5..40, prune to 75% (no growth) from 45,
  so the density is 0.25 at every task's end but not constant in between.
- **Dynamic data removal (DDR).** Forgetting statistics (Toneva et al., ICLR 2019) of the
  current task's training examples, from the argmax of the model's outputs at each
  presentation: a forgetting event is a presentation classified wrongly after one
  classified correctly; an example never classified correctly counts ``epochs`` (more than
  any example can reach). At epochs ``e > 0`` with ``e % update_every_epochs == 0`` and
  ``e <= remove_data_epoch`` the examples with the fewest events are dropped for the rest
  of the task, ``remove_fraction / (remove_data_epoch / update_every_epochs)`` of the task's
  examples each time, and the statistics restart. Ties go in the order the examples were
  first presented since the last removal (the order of the official statistics dict).
- **Dynamic gradient masking (DGM).** After each backward every masked weight's gradient
  is multiplied by its mask and, per layer, the entries below the ``100 *
  gradient_sparsity``-th percentile of ``|g|`` are zeroed
  (:func:`~clbench.adapters.sparse.percentile_gradient_mask`); as the official
  ``--gradient_efficient_mix`` mode, that gradient mask is computed at every
  ``gradient_mask_every``-th mini-batch of an epoch (from the first) and reused in between.
  After each step the weights outside the masks are zeroed.

The official code fills its DER++ buffer by reservoir sampling of the mini-batches it
trains on, so an example removed by DDR is never offered to the buffer again; here the
buffer is filled at the task's end, from the examples still kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from clbench.strategies.replay import DERpp, DERppConfig
from torch import nn

from clbench.adapters.sparse import (
    MaskedLayer,
    MaskSet,
    keep_largest,
    mask_layers,
    percentile_gradient_mask,
)
from clbench.checks import check_positive, check_probability
from clbench.data import TensorBatches
from clbench.errors import ClbenchError, ConfigError
from clbench.models import ClassifierModel
from clbench.seeding import derived_generator

#: the key of the mask generator's seed (``derived_generator(seed, MASK_STREAM)``)
MASK_STREAM = 541


@dataclass
class SparCLConfig(DERppConfig):
    """SparCL's options on top of DER++'s (defaults: the official run script; its epochs,
    batch size and plain SGD at 0.03 are DER++'s defaults already)."""

    loss_mask: str = "current"
    lr_schedule: str = "constant"
    # sparsity every masked layer starts at (magnitude pruning of the initial weights)
    sparsity: float = 0.75
    # convolutions of the backbone kept dense, by qualified name inside the backbone
    dense_layers: list[str] = field(default_factory=lambda: ["conv1"])
    # TDM stages: prune-to (lower bound) and grow-to (upper bound) sparsities; stage i
    # from the i-th of bound_epochs (epochs counted within each task)
    lower_bounds: list[float] = field(default_factory=lambda: [0.75, 0.76, 0.75])
    upper_bounds: list[float] = field(default_factory=lambda: [0.74, 0.75, 0.75])
    bound_epochs: list[int] = field(default_factory=lambda: [5, 45])
    # epochs between mask updates, and between data removals
    update_every_epochs: int = 5
    # weight of |grad| in the pruning importance |w| + lambda |grad|
    prune_grad_weight: float = 0.5
    # DDR: fraction of a task's examples removed in all, and the last removal epoch
    remove_fraction: float = 0.3
    remove_data_epoch: int = 20
    # DGM: fraction of each masked layer's gradient entries zeroed (the smallest |g|)
    gradient_sparsity: float = 0.8
    # DGM: mini-batches (within an epoch) between recomputations of the gradient mask
    gradient_mask_every: int = 30

    def __post_init__(self) -> None:
        super().__post_init__()
        check_probability("strategy.sparsity", self.sparsity)
        n = len(self.bound_epochs) + 1
        if len(self.lower_bounds) != n or len(self.upper_bounds) != n:
            raise ConfigError(
                f"invalid TDM bounds: strategy.lower_bounds {list(self.lower_bounds)} and "
                f"strategy.upper_bounds {list(self.upper_bounds)} need one value per stage, "
                f"{n} for strategy.bound_epochs {list(self.bound_epochs)}"
            )
        for i, (lo, up) in enumerate(zip(self.lower_bounds, self.upper_bounds, strict=True)):
            check_probability(f"strategy.lower_bounds[{i}]", lo)
            check_probability(f"strategy.upper_bounds[{i}]", up)
            if up > lo:
                raise ConfigError(
                    f"invalid value for strategy.upper_bounds[{i}]: {up!r}; a grow-to "
                    f"sparsity must be <= the prune-to sparsity strategy.lower_bounds[{i}] "
                    f"({lo!r})"
                )
        epochs = list(self.bound_epochs)
        if any(e <= 0 for e in epochs) or epochs != sorted(set(epochs)):
            raise ConfigError(
                f"invalid value for strategy.bound_epochs: {epochs}; must be increasing epochs > 0"
            )
        check_positive("strategy.update_every_epochs", self.update_every_epochs)
        check_positive("strategy.prune_grad_weight", self.prune_grad_weight, allow_zero=True)
        check_probability("strategy.remove_fraction", self.remove_fraction)
        check_positive("strategy.remove_data_epoch", self.remove_data_epoch, allow_zero=True)
        check_probability("strategy.gradient_sparsity", self.gradient_sparsity)
        check_positive("strategy.gradient_mask_every", self.gradient_mask_every)


def tdm_bounds(
    epoch: int, lower: list[float], upper: list[float], bound_epochs: list[int]
) -> tuple[float, float]:
    """(prune-to, grow-to) sparsity at ``epoch`` of a task: stage = bound epochs reached."""
    stage = sum(epoch >= e for e in bound_epochs)
    return float(lower[stage]), float(upper[stage])


class ForgettingStats:
    """Forgetting statistics (Toneva et al., ICLR 2019) of ``n`` training examples.

    :meth:`record` takes one presentation of some examples (their ids, and whether each
    was classified correctly); an example's forgetting count is the number of its
    presentations classified wrongly right after a correct one. Kept as running tensors
    (last outcome, events, ever learned, order first presented) so they checkpoint as data.
    """

    def __init__(self, n: int) -> None:
        self.reset(n)

    def reset(self, n: int | None = None) -> None:
        """Forget every presentation (of ``n`` examples; default: as many as before)."""
        n = self.n if n is None else n
        self.n = n
        self.last = torch.full((n,), -1, dtype=torch.int8)  # -1: not presented yet
        self.events = torch.zeros(n, dtype=torch.long)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.first_seen = torch.full((n,), -1, dtype=torch.long)
        self.presented = 0

    @torch.no_grad()
    def record(self, index: torch.Tensor, correct: torch.Tensor) -> None:
        """One presentation of the examples ``index`` (distinct ids); ``correct``: bool."""
        index, correct = index.long().cpu(), correct.bool().cpu()
        self.events[index] += ((self.last[index] == 1) & ~correct).long()
        self.learned[index] |= correct
        self.last[index] = correct.to(torch.int8)
        new = index[self.first_seen[index] < 0]
        self.first_seen[new] = self.presented + torch.arange(len(new))
        self.presented += len(new)

    def counts(self, never_learned: int) -> torch.Tensor:
        """Forgetting count per example; ``never_learned`` for one never classified right
        (and for one not presented)."""
        return torch.where(self.learned, self.events, torch.full_like(self.events, never_learned))

    def lowest(self, candidates: torch.Tensor, n: int, never_learned: int) -> torch.Tensor:
        """The ``n`` presented ``candidates`` (bool over the examples) with the fewest
        forgetting events, ties in the order first presented; as sorted example ids."""
        pool = torch.nonzero(candidates & (self.first_seen >= 0)).flatten()
        pool = pool[torch.argsort(self.first_seen[pool])]
        pool = pool[torch.argsort(self.counts(never_learned)[pool], stable=True)]
        return torch.sort(pool[:n]).values

    def state(self) -> dict[str, Any]:
        return {
            "last": self.last,
            "events": self.events,
            "learned": self.learned,
            "first_seen": self.first_seen,
            "presented": self.presented,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.last = state["last"].to(torch.int8)
        self.events = state["events"].long()
        self.learned = state["learned"].bool()
        self.first_seen = state["first_seen"].long()
        self.presented = int(state["presented"])
        self.n = len(self.last)


class SparCL(DERpp):
    """SparCL: DER++ on a sparse CNN with dynamic masks, data removal and gradient masks.

    Task-aware dynamic masking, dynamic data removal, dynamic gradient masking: see the
    module's docstring; :meth:`sparsity_report` and :meth:`data_removal_report` say what the
    run reached."""

    Config: ClassVar[type[SparCLConfig]] = SparCLConfig
    cfg: SparCLConfig

    # ---------------------------------------------------------------- model
    def prepare_model(self, model: ClassifierModel) -> None:
        if not self.in_memory:
            raise ClbenchError(
                "sparcl tracks each training example (dynamic data removal) and needs the "
                "scenario in memory; this scenario's data is read lazily"
            )
        super().prepare_model(model)
        self.sparse_layers = self._mask_backbone(model)
        self.masks = MaskSet(self.sparse_layers, derived_generator(self.seed, MASK_STREAM))
        with torch.no_grad():  # start at `sparsity` by magnitude (official prune_harden)
            self.masks.set(self._pruned(self.cfg.sparsity, grad_weight=0.0))
        self.masks.apply()
        self._grad_keep: dict[str, torch.Tensor] | None = None
        self._iteration = 0
        self.stats = ForgettingStats(0)
        self.kept = torch.zeros(0, dtype=torch.bool)
        self.removed_per_experience: list[int] = []
        self.train_size_per_experience: list[int] = []
        self._full_data: list[torch.Tensor] | None = None

    def _mask_backbone(self, model: ClassifierModel) -> dict[str, MaskedLayer]:
        convs = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
        unknown = [n for n in self.cfg.dense_layers if n not in convs]
        if unknown:
            raise ConfigError(
                f"invalid value for strategy.dense_layers: {unknown}; not a convolution of "
                f"the backbone; valid names: {', '.join(convs)}"
            )
        dense = {f"backbone.{n}" for n in self.cfg.dense_layers}
        layers = mask_layers(
            model,
            types=(nn.Conv2d,),
            where=lambda name, _m: name.startswith("backbone.") and name not in dense,
        )
        if not layers:
            raise ClbenchError(
                "sparcl masks the backbone's convolutions, and this backbone has none left "
                "to mask; use a CNN backbone such as backbone=wrn_16_2"
            )
        return layers

    def sparsity_report(self) -> dict[str, Any]:
        """The density the masks reached (:meth:`MaskSet.report`)."""
        return self.masks.report()

    def data_removal_report(self) -> dict[str, list[int]]:
        """Per trained experience: training examples, and how many DDR removed."""
        return {
            "train_size_per_experience": list(self.train_size_per_experience),
            "removed_per_experience": list(self.removed_per_experience),
        }

    # ------------------------------------------------------------------ TDM
    def _pruned(self, sparsity: float, grad_weight: float) -> dict[str, torch.Tensor]:
        """Each mask narrowed to ``round((1 - sparsity) * numel)`` positions of largest
        ``|w| + grad_weight * |g|``."""
        out = {}
        for name, layer in self.sparse_layers.items():
            w = layer.weight.detach()
            importance = w.abs()
            if grad_weight > 0 and layer.weight.grad is not None:
                importance = importance + grad_weight * layer.weight.grad.detach().abs()
            keep = round((1.0 - sparsity) * w.numel())
            out[name] = keep_largest(layer.mask, importance, keep)
        return out

    @torch.no_grad()
    def update_topology(self, epoch: int) -> None:
        """TDM at ``epoch`` of a task: prune to the stage's lower bound, regrow at random
        (new weights 0) to its upper bound."""
        lower, upper = tdm_bounds(
            epoch, self.cfg.lower_bounds, self.cfg.upper_bounds, self.cfg.bound_epochs
        )
        self.masks.set(self._pruned(lower, self.cfg.prune_grad_weight))
        self.masks.apply(self.optimizer)
        counts = {}
        for name, layer in self.sparse_layers.items():
            target = round((1.0 - upper) * layer.mask.numel())
            active = int(layer.mask.sum())
            counts[name] = max(0, min(target, layer.mask.numel()) - active)
        if any(counts.values()):
            self.masks.grow(counts, "random", self.optimizer)
        self.masks.apply(self.optimizer)
        self._grad_keep = None  # the gradient mask is recomputed at the next step

    # ------------------------------------------------------------------ DDR
    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        """The house loader over the experience, each mini-batch with the examples' ids
        appended (``mbatch[3]``); DDR's state restarts."""
        super().make_train_dataloader(shuffle=shuffle, **kwargs)
        loader = self.dataloader
        assert isinstance(loader, TensorBatches)  # in memory (checked in prepare_model)
        n = loader.n
        self._full_data = [*loader.tensors, torch.arange(n)]
        self.kept = torch.ones(n, dtype=torch.bool)
        self.stats = ForgettingStats(n)
        self.removed_per_experience.append(0)
        self.train_size_per_experience.append(n)
        self._rebuild_loader()

    def _rebuild_loader(self) -> None:
        old = self.dataloader
        assert self._full_data is not None
        rows = torch.nonzero(self.kept).flatten()
        self.dataloader = TensorBatches(
            [t[rows] for t in self._full_data],
            old.batch_size,
            shuffle=old.shuffle,
            generator=old.generator,
            drop_last=old.drop_last,
        )

    def removal_count(self) -> int:
        """Examples each DDR step removes: ``remove_fraction`` of the task spread over the
        removal epochs (official: remove_n / (remove_data_epoch / mask update frequency))."""
        steps = self.cfg.remove_data_epoch // self.cfg.update_every_epochs
        if steps == 0:
            return 0
        return int(self.cfg.remove_fraction * self.stats.n / steps)

    def remove_data(self) -> torch.Tensor:
        """DDR: drop the kept examples with the fewest forgetting events; returns their ids."""
        drop = self.stats.lowest(self.kept, self.removal_count(), never_learned=self.cfg.epochs)
        self.kept[drop] = False
        self.removed_per_experience[-1] += len(drop)
        self.stats.reset()
        self._rebuild_loader()
        return drop

    def memory_candidates(self) -> list[int]:
        """The buffer is offered the examples still kept at the task's end (official: the
        buffer only ever sees mini-batches trained on)."""
        return torch.nonzero(self.kept).flatten().tolist()

    @property
    def mb_task_id(self) -> torch.Tensor:
        """Task labels are ``mbatch[2]`` (the last element is the examples' ids)."""
        return self.mbatch[2]

    # ---------------------------------------------------------------- hooks
    def _before_training_epoch(self, **kwargs: Any) -> None:
        e, every = self.clock.train_exp_epochs, self.cfg.update_every_epochs
        if e % every == 0:
            self.update_topology(e)
            if 0 < e <= self.cfg.remove_data_epoch and self.cfg.remove_fraction > 0:
                self.remove_data()
        self._iteration = 0
        super()._before_training_epoch(**kwargs)

    def _after_forward(self, **kwargs: Any) -> None:
        super()._after_forward(**kwargs)
        if len(self.mbatch) > 3:  # training rows carry their ids
            start = self.mem_rows
            correct = self.mb_output[start:].detach().argmax(1) == self.mb_y[start:]
            self.stats.record(self.mbatch[3], correct)

    def _after_backward(self, **kwargs: Any) -> None:
        super()._after_backward(**kwargs)
        self.mask_gradients()
        self._iteration += 1

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """DGM: recompute the gradient mask at every ``gradient_mask_every``-th mini-batch
        of the epoch, else multiply the gradients by the last one."""
        if self._grad_keep is None or self._iteration % self.cfg.gradient_mask_every == 0:
            percentile_gradient_mask(self.sparse_layers, 100.0 * self.cfg.gradient_sparsity)
            self._grad_keep = {
                n: (layer.weight.grad != 0) if layer.weight.grad is not None else layer.mask
                for n, layer in self.sparse_layers.items()
            }
            return
        for name, layer in self.sparse_layers.items():
            if layer.weight.grad is not None:
                layer.weight.grad.mul_(self._grad_keep[name])

    def _after_update(self, **kwargs: Any) -> None:
        self.masks.apply(self.optimizer)
        super()._after_update(**kwargs)

    # ------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        grads = {
            n: layer.weight.grad.detach().cpu()
            for n, layer in self.sparse_layers.items()
            if layer.weight.grad is not None
        }
        state["sparcl"] = {
            "masks": {n: m.cpu() for n, m in self.masks.get().items()},
            "mask_rng": self.masks.generator.get_state(),
            "last_grads": grads,  # the pruning importance of the next task's first update
            "forgetting": self.stats.state(),
            "kept": self.kept,
            "removed_per_experience": list(self.removed_per_experience),
            "train_size_per_experience": list(self.train_size_per_experience),
        }
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        own = state.pop("sparcl")
        super().load_extra_state(state)
        self.masks.set(own["masks"])
        self.masks.generator.set_state(own["mask_rng"].cpu())  # loaded on the run's device
        for name, grad in own["last_grads"].items():
            weight = self.sparse_layers[name].weight
            weight.grad = grad.to(weight.device, weight.dtype)
        self.stats.load(own["forgetting"])
        self.kept = own["kept"].bool()
        self.removed_per_experience = [int(v) for v in own["removed_per_experience"]]
        self.train_size_per_experience = [int(v) for v in own["train_size_per_experience"]]
