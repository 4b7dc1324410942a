"""The shared prompt path (prompt and prefix tuning) and the prompt learners."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clbench.adapters.prompts import (
    PromptPool,
    QueryCache,
    gram_schmidt_,
    prefix_attention,
    prefixed_block,
    prompted_tokens,
    query_features,
)
from clbench.backbones.micro_vit import build_micro_vit
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.registry import SCENARIOS, STRATEGIES
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
    feats = st.features(x, query_features(vit, x))
    assert feats.shape == (6, vit.embed_dim)
    assert st.last_selection is not None and st.last_selection.shape == (6, 5)
    loss = F.cross_entropy(st.model.head(feats), torch.arange(6) % 4) + st.aux_loss
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


# ------------------------------------------------------------------ prefix tuning
def _explicit_prefix_attention(attn, x, pk, pv):
    """Per-head softmax attention over [prefix keys, token keys] written out by hand."""
    b, _, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(d, dim=-1)
    k = torch.cat([pk.expand(b, -1, -1), k], dim=1)
    v = torch.cat([pv.expand(b, -1, -1), v], dim=1)
    out = torch.zeros_like(q)
    for i in range(h):
        s = slice(i * hd, (i + 1) * hd)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / hd**0.5, dim=-1)
        out[..., s] = w @ v[..., s]
    return attn.proj(out)


def test_prefix_attention_matches_an_explicit_computation():
    vit = _vit()
    attn = vit.blocks[1].attn
    x = torch.randn(3, 17, vit.embed_dim)
    pk, pv = torch.randn(3, 4, vit.embed_dim), torch.randn(1, 4, vit.embed_dim)
    got = prefix_attention(attn, x, pk, pv)
    assert got.shape == x.shape
    assert torch.allclose(got, _explicit_prefix_attention(attn, x, pk, pv), atol=1e-5)
    empty = torch.zeros(1, 0, vit.embed_dim)
    assert torch.allclose(prefix_attention(attn, x, empty, empty), attn(x), atol=1e-6)


def test_prefixes_change_only_their_blocks_and_keep_the_sequence_length():
    vit = _vit()
    x = torch.randn(2, 1, 16, 16)
    plain = vit.forward_features(x)
    assert torch.allclose(prompted_tokens(vit, x, prefixes={}), plain)
    p = torch.randn(1, 3, vit.embed_dim)
    out = prompted_tokens(vit, x, prefixes={2: (p, p)})
    assert out.shape == plain.shape and not torch.allclose(out, plain, atol=1e-4)
    # blocks 0-1 untouched: the same tokens enter block 2 either way
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    h = vit.blocks[1](vit.blocks[0](tokens))
    h = prefixed_block(vit.blocks[2], h, (p, p))
    assert torch.allclose(vit.norm(vit.blocks[3](h)), out, atol=1e-5)
    with pytest.raises(ConfigError, match="out of range"):
        prompted_tokens(vit, x, prefixes={9: (p, p)})


def test_query_cache_serves_repeats_without_a_pass():
    vit = _vit()
    cache = QueryCache()
    x = torch.randn(5, 1, 16, 16)
    first = cache(lambda b: query_features(vit, b), x)
    assert (cache.passes, cache.hits) == (5, 0)
    again = cache(
        lambda b: query_features(vit, b), torch.cat([x[[3, 1]], torch.randn(1, 1, 16, 16)])
    )
    assert (cache.passes, cache.hits) == (6, 2)
    assert torch.allclose(again[:2], first[[3, 1]])
    assert torch.allclose(first, query_features(vit, x), atol=1e-6)


def test_query_cache_gives_the_same_run_and_fewer_passes(tmp_path):
    runs = {}
    for cache in ("true", "false"):
        out = tmp_path / cache
        args = ["run", *FAST, "strategy=l2p", "strategy.epochs=2", f"strategy.query_cache={cache}"]
        assert run_cli([*args, f"runs_dir={out}"]) == 0
        runs[cache] = results_of(only_run_dir(out))
    cached, plain = runs["true"], runs["false"]
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
    assert plain["efficiency"]["passes_per_train_sample"] == pytest.approx(2.0)
    # 2 epochs: the query pass runs in the first only -> 1 + 1/2 passes per sample
    assert cached["efficiency"]["passes_per_train_sample"] == pytest.approx(1 + 1 / 2)
    assert cached["efficiency"]["passes_per_prediction"] == pytest.approx(2.0)


# --------------------------------------------------------------------- DualPrompt
def _cfg_of(name, **overrides):
    return STRATEGIES.get(name).Config(name=name, **overrides)


def _strategy(name, n_experiences=3, **overrides):
    vit = _vit()
    cfg = _cfg_of(name, **overrides)
    st = STRATEGIES.get(name)(
        model=ClassifierModel(vit, vit.num_features), cfg=cfg, n_experiences=n_experiences
    )
    st.model.head.grow(4)
    return st, vit


def test_dualprompt_trains_the_task_prompt_and_picks_by_key_at_test():
    st, vit = _strategy("dualprompt", e_layers=[2, 3])
    st.is_training = True  # what Avalanche sets during training
    st.adapt_to_experience()
    st.adapt_to_experience()  # task 1
    x = torch.randn(6, 1, 16, 16)
    feats = st.features(x, query_features(vit, x))
    assert (st.last_selection == 1).all()
    (st.model.head(feats).sum() + st.aux_loss).backward()
    pool = st.model.e_pool
    touched = pool.prompts.grad.flatten(1).abs().sum(1) > 0
    assert touched.tolist() == [i == 1 for i in range(10)]
    assert (pool.keys.grad.abs().sum(1) > 0).tolist() == [i == 1 for i in range(10)]
    assert st.model.g_prompt.grad is not None and st.model.g_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())
    st.is_training = False
    with torch.no_grad():
        pool.keys[4] = query_features(vit, x[:1])[0]  # key 4 = the first input's query
        st.features(x, query_features(vit, x))
    assert st.last_selection[0, 0] == 4


def test_dualprompt_refuses_more_tasks_than_prompts():
    with pytest.raises(ConfigError, match="pool_size"):
        _strategy("dualprompt", n_experiences=12)


# -------------------------------------------------------------------- CODA-Prompt
def test_coda_new_components_are_orthogonal_to_earlier_ones():
    st, _ = _strategy("coda_prompt", n_experiences=3, pool_size=30, layers=[0, 1])
    st.adapt_to_experience()  # task 0: components 0-9
    comps = list(st.model.coda.values())
    with torch.no_grad():  # what training does to them: no longer orthogonal
        for c in comps:
            for w in (c.K, c.A, c.P):
                w[:10] += 0.3 * torch.randn_like(w[:10])
    st.adapt_to_experience()  # task 1: components 10-19
    for c in comps:
        for w in (c.K, c.A, c.P.flatten(1)):
            old, new = w[:10], w[10:20]
            assert (new @ old.T).abs().max() < 1e-5
            assert torch.allclose(new @ new.T, torch.eye(10), atol=1e-5)
            assert (w[20:] == 0).all()


def test_coda_earlier_components_get_no_gradient():
    st, vit = _strategy("coda_prompt", n_experiences=2, pool_size=20, layers=[0, 1, 2])
    st.is_training = True
    st.adapt_to_experience()
    st.adapt_to_experience()  # task 1: components 10-19 train, 0-9 are detached
    x = torch.randn(5, 1, 16, 16)
    st.model.head(st.features(x, query_features(vit, x))).sum().backward()
    for c in st.model.coda.values():
        for w in (c.K, c.A, c.P):
            g = w.grad.flatten(1).abs().sum(1)
            assert (g[:10] == 0).all() and (g[10:] > 0).all()


def test_coda_earlier_components_do_not_move_in_later_tasks():
    build = SCENARIOS.get("split_digits")
    exps = list(build(build.Config(n_experiences=2)).train_stream)
    vit = _vit()
    cfg = _cfg_of("coda_prompt", pool_size=20, layers=[0, 1], epochs=2)
    st = STRATEGIES.get("coda_prompt")(
        model=ClassifierModel(vit, vit.num_features), cfg=cfg, n_experiences=2
    )
    st.train(exps[0], eval_streams=[])
    after_first = {k: v.clone() for k, v in st.model.coda.state_dict().items()}
    st.train(exps[1], eval_streams=[])
    for k, v in st.model.coda.state_dict().items():
        assert torch.equal(v[:10], after_first[k][:10]), k
        assert not torch.equal(v[10:], after_first[k][10:]), k


def test_gram_schmidt_refuses_more_components_than_width():
    w = torch.zeros(5, 3)
    with pytest.raises(ConfigError, match="at most 3"):
        gram_schmidt_(w, 0, 5, torch.Generator().manual_seed(0))


def test_coda_refuses_a_pool_wider_than_the_backbone():
    with pytest.raises(ConfigError, match="pool_size=100 exceeds the backbone width 64"):
        _strategy("coda_prompt", pool_size=100)


@pytest.mark.parametrize("name", ["dualprompt", "coda_prompt"])
def test_cli_runs_prefix_learners(tmp_path, name):
    code = run_cli(["run", *FAST, f"strategy={name}", f"runs_dir={tmp_path}"])
    assert code == 0
    res = results_of(only_run_dir(tmp_path))
    assert len(res["accuracy_matrix"]) == 2
    assert res["efficiency"]["passes_per_prediction"] == pytest.approx(2.0)
