"""The shared prompt path and the L2P strategy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.adapters.prompts import PromptPool, prompted_tokens, query_features
from clbench.backbones.micro_vit import build_micro_vit
from clbench.models import ClassifierModel
from clbench.registry import STRATEGIES
from helpers import FAST, only_run_dir, results_of, run_cli


def _cfg(**overrides):
    return STRATEGIES.get("l2p").Config(name="l2p", **overrides)


def _vit():
    torch.manual_seed(0)
    return build_micro_vit().eval()


def test_prompted_tokens_shapes_and_zero_prompts_are_the_plain_forward():
    vit = _vit()
    x = torch.randn(3, 1, 16, 16)
    plain = vit.forward_features(x)
    assert torch.allclose(prompted_tokens(vit, x), plain)
    assert torch.allclose(prompted_tokens(vit, x, torch.zeros(3, 0, vit.embed_dim)), plain)
    prompted = prompted_tokens(vit, x, torch.randn(3, 7, vit.embed_dim))
    assert prompted.shape == (3, plain.shape[1] + 7, vit.embed_dim)
    query = query_features(vit, x)
    assert query.shape == (3, vit.embed_dim) and not query.requires_grad
    assert torch.allclose(query, vit(x))


def test_frozen_backbone_gets_no_gradient_prompts_keys_head_do():
    vit = _vit()
    st = STRATEGIES.get("l2p")(model=ClassifierModel(vit, vit.num_features), cfg=_cfg())
    st.model.head.grow(4)
    x = torch.randn(6, 1, 16, 16)
    feats = st.features(x)
    assert feats.shape == (6, vit.embed_dim)
    assert st.last_selection is not None and st.last_selection.shape == (6, 5)
    loss = F.cross_entropy(st.model.head(feats), torch.arange(6) % 4) + st.pull_term
    loss.backward()
    assert all(p.grad is None for p in vit.parameters())
    pool = st.pool
    assert pool.prompts.grad is not None and pool.keys.grad is not None
    assert st.model.head.fc.weight.grad is not None
    trainable = {id(p) for p in st.trainable_parameters()}
    assert trainable == {id(p) for p in [*pool.parameters(), *st.model.head.parameters()]}


def test_keys_pulled_by_a_task_are_selected_by_its_inputs():
    """Two tasks with distinct queries, trained in turn with the pull constraint: each
    key is "owned" by the task that selected it more often; afterwards each task's
    inputs pick their own task's keys far more often than chance."""
    torch.manual_seed(0)
    dim, pool = 16, PromptPool(pool_size=10, length=2, dim=16, top_k=3)
    centres = F.normalize(torch.randn(2, dim), dim=-1) * 3

    def queries(task: int) -> torch.Tensor:
        return centres[task] + torch.randn(64, dim)

    counts = torch.zeros(2, 10)
    opt = torch.optim.Adam(pool.parameters(), lr=0.03)
    for task in (0, 1):
        for _ in range(60):
            sel = pool.select(queries(task))
            counts[task] += torch.bincount(sel.index.flatten(), minlength=10)
            opt.zero_grad()
            sel.pull.backward()
            opt.step()
    owned = [counts[0] > counts[1], counts[1] > counts[0]]
    with torch.no_grad():
        share = [float(owned[t][pool.select(queries(t)).index].float().mean()) for t in (0, 1)]
    chance = [float(o.float().mean()) for o in owned]
    assert share[0] > 0.9 and share[0] > chance[0] + 0.2, (share, chance)
    assert share[1] > 0.7 and share[1] > chance[1] + 0.2, (share, chance)


def test_cli_runs_l2p(tmp_path):
    code = run_cli(["run", *FAST, "strategy=l2p", f"runs_dir={tmp_path}"])
    assert code == 0
    res = results_of(only_run_dir(tmp_path))
    assert len(res["accuracy_matrix"]) == 2
    assert res["efficiency"]["trainable_params"] > 0
