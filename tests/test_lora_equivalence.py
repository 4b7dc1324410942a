"""The LoRA building block against references: PEFT, explicit attention, the bare backbones."""

from __future__ import annotations

import copy
import math
from collections import Counter, OrderedDict
from collections.abc import Callable

import open_clip
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from clbench.adapters.lora import (
    LoRABlock,
    LoRALinear,
    LoRAMultiheadAttention,
    add_blocks,
    inject_lora,
    lora_layers,
    merge_all,
    unload_lora,
)
from clbench.backbones.micro_vit import build_micro_vit

ALL_TARGETS = ["q", "k", "v", "proj", "fc1", "fc2"]
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def _tiny_clip() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=64, patch_size=8, image_size=32, head_width=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=16, vocab_size=100, width=64, heads=2, layers=2
        ),
    ).eval()


def _backbone(kind: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A tiny backbone and a function running it on fixed inputs (both CLIP towers)."""
    if kind == "micro_vit":
        torch.manual_seed(0)
        x = torch.randn(3, 1, 16, 16)
        return build_micro_vit().eval(), lambda m: m(x)
    model = _tiny_clip()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16))
    return model, lambda m: torch.cat([m.encode_image(images), m.encode_text(tokens)])


def _randomise(blocks: list[LoRABlock], std: float = 0.1) -> None:
    with torch.no_grad():
        for b in blocks:
            b.B.normal_(0, std)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _MatmulOps(TorchDispatchMode):
    """Records the aten matmuls a forward dispatches, by operand shapes (bias left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[tuple[tuple[int, ...], ...]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        tensors = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        if name in MATMUL_OPS:
            self.ops[tuple(tensors[-2:])] += 1  # addmm / baddbmm: (bias, a, b)
        elif "scaled_dot_product" in name:
            self.ops[tuple(tensors[:3])] += 1  # q, k, v
        return func(*args, **(kwargs or {}))


def _flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize(("rank", "alpha"), [(4, 8.0), (3, 1.0)])
def test_plain_block_equals_peft_lora(rank: int, alpha: float) -> None:
    from peft import LoraConfig, get_peft_model  # dev extra; imported here, it loads slowly

    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LoRALinear(copy.deepcopy(base))
    block = ours.add_block(rank, alpha)
    with torch.no_grad():
        block.B.normal_()  # non-zero B; A keeps its kaiming init
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0)
    theirs = get_peft_model(nn.Sequential(OrderedDict(lin=copy.deepcopy(base))), config)
    layer = theirs.base_model.model.lin
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(block.A)
        layer.lora_B["default"].weight.copy_(block.B)
    x = torch.randn(7, 5, 16)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    assert torch.allclose(ours.delta_weight(), layer.get_delta_weight("default"), atol=1e-6)
    ours.merge()
    merged = theirs.merge_and_unload().lin
    assert torch.allclose(ours.base.weight, merged.weight, atol=1e-6)
    assert torch.allclose(ours(x), merged(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["micro_vit", "open_clip"])
def test_merge_preserves_outputs(kind: str) -> None:
    model, run = _backbone(kind)
    bare = run(model).detach()
    _randomise(add_blocks(model, ALL_TARGETS, rank=3, alpha=6.0))
    before = run(model).detach()
    assert not torch.allclose(before, bare, atol=1e-3)  # the LoRA takes effect everywhere
    w0 = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    for layer in lora_layers(model).values():
        layer.merge()
    assert torch.allclose(run(model), before, atol=1e-5)
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        assert torch.allclose(layer.base.weight, w0[name], atol=1e-6)
    assert torch.allclose(run(model), before, atol=1e-5)


@pytest.mark.parametrize("kind", ["micro_vit", "open_clip"])
def test_merged_model_costs_the_bare_backbone(kind: str) -> None:
    model, run = _backbone(kind)
    bare = copy.deepcopy(model)
    blocks = add_blocks(model, ALL_TARGETS, rank=3, alpha=6.0)
    _randomise(blocks)
    assert _flops(lambda: run(model)) > _flops(lambda: run(bare))  # unmerged: LoRA matmuls
    for layer in lora_layers(model).values():
        layer.merge()
    calls: list[str] = []
    for b in blocks:
        b.register_forward_hook(lambda m, i, o: calls.append("block"))
    bare_ops, merged_ops = _MatmulOps(), _MatmulOps()
    with bare_ops:
        run(bare)
    with merged_ops:
        expected = run(model)
    assert calls == []  # no LoRA block runs in a merged forward
    # the same matmuls on the same shapes: one per projection, as in the bare backbone
    assert merged_ops.ops == bare_ops.ops
    assert _flops(lambda: run(model)) == _flops(lambda: run(bare))
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    assert _n_params(model) - block_params == _n_params(bare)
    merge_all(lora_layers(model).values())
    assert _n_params(model) == _n_params(bare)
    unload_lora(model)  # back to the bare architecture, names and modules
    assert not lora_layers(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in bare.modules()]
    bare_state, state = bare.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in bare_state.items()}
    assert torch.allclose(run(model), expected, atol=1e-5)


def _explicit_attention(
    mha: LoRAMultiheadAttention, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Self-attention by hand with W_in + s B A (per q/k/v slice) and W_out + s B A."""
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    w_in = mha.in_proj.base.weight.clone()
    for b in mha.in_proj.blocks:
        lo, hi = b.out_slice or (0, 3 * e)
        w_in[lo:hi] += b.scale * b.B @ b.A
    w_out = mha.out_proj.base.weight.clone()
    for b in mha.out_proj.blocks:
        w_out += b.scale * b.B @ b.A
    qkv = x @ w_in.T + mha.in_proj.base.bias
    q, k, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
    heads = []
    for i in range(h):
        cols = slice(i * d, (i + 1) * d)
        scores = q[..., cols] @ k[..., cols].transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        heads.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    return torch.cat(heads, dim=-1) @ w_out.T + mha.out_proj.base.bias


@pytest.mark.parametrize("tower", ["image", "text"])
def test_lora_attention_equals_explicit_computation(tower: str) -> None:
    model = _tiny_clip()
    add_blocks(model, ["q", "k", "v", "out_proj"], rank=2, alpha=4.0, tower=tower)
    _randomise([b for m in lora_layers(model).values() for b in m.blocks], std=0.2)
    transformer = model.visual.transformer if tower == "image" else model.transformer
    mha = transformer.resblocks[0].attn
    assert isinstance(mha, LoRAMultiheadAttention)
    # the text tower passes open_clip's causal float mask, the image tower none
    mask = model.attn_mask if tower == "text" else None
    x = torch.randn(3, 16, 64)
    expected = _explicit_attention(mha, x, mask)
    for need_weights in (False, True):
        out, _ = mha(x, x, x, need_weights=need_weights, attn_mask=mask)
        assert torch.allclose(out, expected, atol=1e-5)
    if tower == "text":  # the same through the hint: is_causal without a mask
        out, _ = mha(x, x, x, need_weights=False, is_causal=True)
        assert torch.allclose(out, expected, atol=1e-5)
        assert not torch.allclose(_explicit_attention(mha, x, None), expected, atol=1e-3)


@pytest.mark.parametrize("no_grad", [False, True])
def test_zero_initialised_lora_leaves_clip_towers_unchanged(no_grad: bool) -> None:
    model, run = _backbone("open_clip")
    with torch.set_grad_enabled(not no_grad):  # no_grad: the bare MHA takes its fast path
        bare = run(model)
        add_blocks(model, ALL_TARGETS, rank=4, alpha=8.0, tower="both")
        assert torch.allclose(run(model), bare, atol=1e-6)
    assert all(isinstance(b.attn, LoRAMultiheadAttention) for b in model.transformer.resblocks)


_MASKS: dict[str, Callable[[int, int, int], dict[str, torch.Tensor | bool]]] = {
    "none": lambda n, length, h: {},
    "bool": lambda n, length, h: {"attn_mask": torch.rand(length, length) > 0.7},
    "float": lambda n, length, h: {"attn_mask": torch.randn(length, length)},
    "per_head": lambda n, length, h: {"attn_mask": torch.randn(n * h, length, length)},
    "padding": lambda n, length, h: {
        "key_padding_mask": torch.arange(length).expand(n, length) >= length - 2
    },
    "causal": lambda n, length, h: {
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(length),
        "is_causal": True,
    },
}


@pytest.mark.parametrize("masks", sorted(_MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_is_a_drop_in_for_multihead_attention(masks: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = LoRAMultiheadAttention(copy.deepcopy(mha)).eval()
    n, length = 2, 6
    kwargs = _MASKS[masks](n, length, 4)
    x = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    for need_weights in (False, True):
        ref, ref_w = mha(x, x, x, need_weights=need_weights, **kwargs)
        out, w = ours(x, x, x, need_weights=need_weights, **kwargs)
        assert torch.allclose(out, ref, atol=1e-5, equal_nan=True)
        if need_weights:
            assert torch.allclose(w, ref_w, atol=1e-5, equal_nan=True)
    if masks == "none":  # cross-attention and unbatched input
        kv = torch.randn_like(x)
        assert torch.allclose(ours(x, kv, kv)[0], mha(x, kv, kv)[0], atol=1e-5)
        assert torch.allclose(ours(x[0], x[0], x[0])[0], mha(x[0], x[0], x[0])[0], atol=1e-5)


def test_cross_attention_lora_matches_merged_weights() -> None:
    torch.manual_seed(0)
    ours = LoRAMultiheadAttention(nn.MultiheadAttention(16, 4, batch_first=True)).eval()
    in_proj = ours.in_proj = LoRALinear(ours.in_proj)
    _randomise([in_proj.add_block(2, 4.0, out_slice=(0, 16)), in_proj.add_block(2, 4.0)])
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    before = ours(q, kv, kv)[0]
    in_proj.merge()
    assert torch.allclose(ours(q, kv, kv)[0], before, atol=1e-5)


def test_gradients_reach_lora_in_open_clip_attention() -> None:
    model, run = _backbone("open_clip")
    model.requires_grad_(False)
    blocks = add_blocks(model, ["qkv", "out_proj"], rank=2, alpha=4.0)
    run(model).square().sum().backward()
    assert all(b.B.grad is not None and b.B.grad.abs().sum() > 0 for b in blocks)
    assert all(m.base.weight.grad is None for m in lora_layers(model).values())


def test_towers_and_aliases_select_the_open_clip_layers() -> None:
    model = _tiny_clip()
    image = inject_lora(model, ["proj", "fc1"], tower="image")
    assert image and all(n.startswith("visual.") for n in image)
    assert {n.rsplit(".", 1)[1] for n in image} == {"out_proj", "c_fc"}
    assert isinstance(model.transformer.resblocks[0].attn, nn.MultiheadAttention)
    text = inject_lora(model, ["qkv", "c_proj"], tower="text")
    assert text and not any(n.startswith("visual.") for n in text)
    assert set(text) == {
        f"transformer.resblocks.{i}.{s}" for i in range(2) for s in ("attn.in_proj", "mlp.c_proj")
    }
    assert set(inject_lora(model, ["out_proj", "c_fc"])) == set(image) | {
        f"transformer.resblocks.{i}.{s}" for i in range(2) for s in ("attn.out_proj", "mlp.c_fc")
    }
    vit = build_micro_vit()
    assert set(inject_lora(vit, ["out_proj", "c_fc", "c_proj"])) == set(
        inject_lora(vit, ["proj", "fc1", "fc2"])
    )
    with pytest.raises(ValueError, match="valid towers"):
        inject_lora(model, ["q"], tower="vision")
    with pytest.raises(ValueError, match="image tower"):
        inject_lora(vit, ["q"], tower="image")
