"""The shared LoRA building block on timm's ViT module names."""

import copy

import pytest
import torch
from torch import nn

from clbench.adapters.lora import LoRALinear, add_blocks, inject_lora, lora_layers
from clbench.backbones.micro_vit import build_micro_vit


def _randomise(blocks):
    with torch.no_grad():
        for b in blocks:
            b.B.normal_(0, 0.1)


def test_fresh_blocks_do_not_change_outputs():
    torch.manual_seed(0)
    vit = build_micro_vit().eval()
    x = torch.randn(4, 1, 16, 16)
    ref = vit(x)
    add_blocks(vit, ["qkv", "proj", "fc1", "fc2"], rank=4, alpha=8)
    assert torch.allclose(vit(x), ref, atol=1e-6)


def test_injection_uses_vit_module_names():
    vit = build_micro_vit()
    layers = inject_lora(vit, ["qkv", "fc2"])
    depth = len(vit.blocks)
    assert set(layers) == {f"blocks.{i}.attn.qkv" for i in range(depth)} | {
        f"blocks.{i}.mlp.fc2" for i in range(depth)
    }
    assert isinstance(vit.blocks[0].attn.qkv, LoRALinear)
    assert isinstance(vit.blocks[0].mlp.fc1, nn.Linear)


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="valid targets"):
        inject_lora(build_micro_vit(), ["query"])


def test_merge_preserves_outputs_and_unmerge_restores_weights():
    torch.manual_seed(0)
    vit = build_micro_vit().eval()
    blocks = add_blocks(vit, ["q", "v", "fc1"], rank=3, alpha=6)
    _randomise(blocks)
    x = torch.randn(4, 1, 16, 16)
    before = vit(x)
    w0 = {n: m.base.weight.clone() for n, m in lora_layers(vit).items()}
    for m in lora_layers(vit).values():
        m.merge()
    assert torch.allclose(vit(x), before, atol=1e-5)
    for n, m in lora_layers(vit).items():
        m.unmerge()
        assert torch.allclose(m.base.weight, w0[n], atol=1e-6)


def test_q_and_v_slices_touch_only_their_rows():
    torch.manual_seed(0)
    base = nn.Linear(8, 24)
    layer = LoRALinear(copy.deepcopy(base))
    vb = layer.add_block(2, 2.0, out_slice=(16, 24))
    with torch.no_grad():
        vb.B.normal_()
    x = torch.randn(5, 8)
    diff = layer(x) - base(x)
    assert torch.all(diff[:, :16] == 0)
    assert diff[:, 16:].abs().sum() > 0
    assert torch.allclose(layer.delta_weight()[:16], torch.zeros(16, 8))


def test_gate_and_magnitude_scale_the_update():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 6))
    b = layer.add_block(3, 3.0, gated=True, magnitude=0.5)
    with torch.no_grad():
        b.B.normal_()
        b.gate.copy_(torch.tensor([1.0, 0.0, 2.0]))
    expected = 0.5 * (b.B * torch.tensor([1.0, 0.0, 2.0])) @ b.A
    assert torch.allclose(layer.delta_weight(), expected, atol=1e-6)
    x = torch.randn(2, 6)
    assert torch.allclose(layer(x), layer.base(x) + x @ expected.T, atol=1e-5)


def test_only_the_newest_block_trains_after_freeze():
    layer = LoRALinear(nn.Linear(4, 4))
    old = layer.add_block(2, 2.0)
    layer.freeze_blocks()
    new = layer.add_block(2, 2.0)
    assert not any(p.requires_grad for p in old.parameters())
    assert all(p.requires_grad for p in new.parameters())
    assert not layer.base.weight.requires_grad


def test_normalized_block_scales_unit_direction_by_magnitude():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 7))
    b = layer.add_block(2, 2.0, magnitude=0.8, normalized=True)
    with torch.no_grad():
        b.B.normal_()
    direction = b.B @ b.A / (torch.linalg.norm(b.B) * torch.linalg.norm(b.A))
    assert torch.allclose(layer.delta_weight(), 0.8 * direction, atol=1e-6)
    with torch.no_grad():
        b.B.mul_(3.0)  # rescaling the factors leaves a normalised update unchanged
    assert torch.allclose(layer.delta_weight(), 0.8 * direction, atol=1e-6)
