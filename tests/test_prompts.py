"""The shared prompt path (prompt and prefix tuning) and the prompt learners."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clbench.adapters.prompts import (
    PromptPool,
    QueryCache,
    batch_vote,
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
    st, vit = _strategy("dualprompt", e_layers=[2, 3], batchwise=False)
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


# ------------------------------------------------------------- the official recipe
def _digits(n_experiences=2):
    build = SCENARIOS.get("split_digits")
    return list(build(build.Config(n_experiences=n_experiences)).train_stream)


class StepProbe:
    """Records, at every optimizer step, the lr of each group and the gradient norm."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.norms: list[float] = []

    def __enter__(self) -> StepProbe:
        def hook(opt, args, kwargs):
            grads = [
                p.grad.flatten()
                for g in opt.param_groups
                for p in g["params"]
                if p.grad is not None
            ]
            self.norms.append(float(torch.cat(grads).norm()))
            self.lrs.extend(g["lr"] for g in opt.param_groups)

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _train_one_experience(name, **overrides) -> StepProbe:
    vit = _vit()
    overrides = {"epochs": 1, **overrides}
    if name == "dualprompt":
        overrides["e_layers"] = [2, 3]  # the micro ViT's blocks
    st = STRATEGIES.get(name)(
        model=ClassifierModel(vit, vit.num_features),
        cfg=_cfg_of(name, **overrides),
        n_experiences=2,
    )
    with StepProbe() as probe:
        st.train(_digits()[0], eval_streams=[])
    assert probe.lrs
    return probe


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_the_optimizer_gets_the_base_lr_times_batch_over_256(name):
    assert _cfg_of(name).lr_scale_batch == 256 and _cfg_of(name).clip_grad == 1.0
    probe = _train_one_experience(name, lr=0.005, batch_size=16)
    assert probe.lrs == [pytest.approx(0.005 * 16 / 256)] * len(probe.lrs)
    # the per-experience cosine schedule runs from the scaled rate: epoch 1 of 2 at half
    probe = _train_one_experience(name, lr=0.03, batch_size=64, lr_schedule="cosine", epochs=2)
    half = len(probe.lrs) // 2
    assert probe.lrs[:half] == [pytest.approx(0.03 * 64 / 256)] * half
    assert probe.lrs[half:] == [pytest.approx(0.03 * 64 / 256 / 2)] * half
    probe = _train_one_experience(name, lr=0.03, batch_size=16, lr_scale_batch=0)
    assert probe.lrs == [pytest.approx(0.03)] * len(probe.lrs)


def test_the_given_config_is_kept_and_the_training_one_is_scaled():
    st, _ = _strategy("l2p", lr=0.03, batch_size=32)
    assert st.given_cfg.lr == 0.03 and st.given_cfg.lr_scale_batch == 256
    assert st.cfg.lr == pytest.approx(0.00375) and st.cfg.lr_scale_batch == 0
    assert st.cfg.resolved() is st.cfg
    coda, _ = _strategy("coda_prompt", pool_size=30)
    assert coda.cfg.lr == 1e-3 and coda.cfg.clip_grad == 0.0
    for bad in ({"lr_scale_batch": -1}, {"clip_grad": -0.5}, {"prompt_pos": "patch"}):
        with pytest.raises(ConfigError, match="strategy\\."):
            _cfg(**bad)


@pytest.mark.parametrize("name", ["l2p", "dualprompt"])
def test_gradients_are_clipped_to_norm_1_before_every_step(name):
    """A huge pull weight makes the raw gradient norm far above 1; with clip_grad 1 every
    step sees a gradient of norm <= 1."""
    raw = _train_one_experience(name, pull=1000.0, clip_grad=0.0)
    assert max(raw.norms) > 10
    clipped = _train_one_experience(name, pull=1000.0)
    assert max(clipped.norms) <= 1.0 + 1e-4


def test_l2p_prompt_tokens_get_the_cls_position_embedding():
    """The official PyTorch L2P repeats the CLS entry of pos_embed for every prompt token:
    the sequence [cls + pos_0, prompts + pos_0, patches + pos_1..] written out by hand."""
    st, vit = _strategy("l2p", batchwise=False)
    with torch.no_grad():
        vit.pos_embed.normal_()  # a position embedding large enough to matter
    x = torch.randn(3, 1, 16, 16)
    query = query_features(vit, x)
    with torch.no_grad():
        got = st.features(x, query)
        prompts = st.pool.prompts[st.last_selection].flatten(1, 2)  # (3, 25, D)
        pos = vit.pos_embed
        seq = torch.cat(
            [
                vit.cls_token.expand(3, -1, -1) + pos[:, :1],
                prompts + pos[:, :1],
                vit.patch_embed(x) + pos[:, 1:],
            ],
            dim=1,
        )
        out = vit.norm(vit.blocks(vit.norm_pre(seq)))
        assert torch.allclose(got, out[:, 1 : 1 + prompts.shape[1]].mean(1), atol=1e-5)
        st.cfg.prompt_pos = "none"  # the JAX code's: no position embedding on prompts
        bare = st.features(x, query)
        seq[:, 1 : 1 + prompts.shape[1]] = prompts
        out = vit.norm(vit.blocks(vit.norm_pre(seq)))
        assert torch.allclose(bare, out[:, 1 : 1 + prompts.shape[1]].mean(1), atol=1e-5)
        assert not torch.allclose(bare, got, atol=1e-3)


def test_batch_vote_takes_the_most_frequent_ids_ties_to_the_lower():
    index = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 1, 5]])
    assert batch_vote(index, 6).tolist() == [2, 1, 3]  # counts 4, 3, 2; then 0, 4, 5 once
    assert batch_vote(torch.tensor([[3, 1], [2, 0]]), 4).tolist() == [0, 1]


def test_batchwise_selection_gives_every_sample_the_batchs_most_frequent_ids():
    torch.manual_seed(0)
    pool = PromptPool(pool_size=10, length=2, dim=16, top_k=3)
    query = torch.randn(12, 16)
    own = pool.select(query).index
    assert len({tuple(r) for r in own.tolist()}) > 1  # per sample, the picks differ
    counts = torch.bincount(own.flatten(), minlength=10).tolist()
    expected = sorted(range(10), key=lambda i: (-counts[i], i))[:3]
    sel = pool.select(query, batchwise=True)
    assert sel.index.tolist() == [expected] * 12
    assert torch.equal(sel.prompts, pool.prompts[expected].flatten(0, 1).expand(12, -1, -1))
    cos = F.normalize(query, dim=-1) @ F.normalize(pool.keys[expected], dim=-1).T
    assert torch.allclose(sel.pull, (1 - cos).sum(1).mean())  # pulled to the voted keys


def test_l2p_votes_in_training_and_at_test_dualprompt_at_test_only():
    x = torch.randn(8, 1, 16, 16)
    st, vit = _strategy("l2p")
    for training in (True, False):
        st.is_training = training
        st.features(x, query_features(vit, x))
        assert (st.last_selection == st.last_selection[0]).all()
    st, vit = _strategy("dualprompt", e_layers=[2, 3])
    st.is_training = False
    with torch.no_grad():  # keys 4 and 7 = the queries of inputs 0 and 1; 4 = 3 votes
        q = query_features(vit, x)
        st.model.e_pool.keys[4], st.model.e_pool.keys[7] = q[0], q[1]
        x = torch.cat([x[:1].expand(3, -1, -1, -1), x[1:2].expand(2, -1, -1, -1)])
        st.cfg.batchwise = False
        st.features(x, query_features(vit, x))
        assert st.last_selection.flatten().tolist() == [4, 4, 4, 7, 7]
        st.cfg.batchwise = True
        st.features(x, query_features(vit, x))
        assert st.last_selection.flatten().tolist() == [4] * 5
