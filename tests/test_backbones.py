"""Typed backbones: accepted inputs, the classifier they build, what counts as a pass."""

from __future__ import annotations

import copy

import torch

from clbench.backbones.base import precomputed_features
from clbench.models import ClassifierModel
from clbench.registry import BACKBONES


def test_a_backbone_over_precomputed_feature_bags():
    bags = precomputed_features("uni_features", 1024, source="UNI patch features")
    assert bags.accepts((17, 1024)) and bags.accepts((3000, 1024))  # any bag size
    assert not bags.accepts((17, 512)) and not bags.accepts((1, 16, 16))
    assert bags.describe_inputs() == "(any, 1024)"
    model = bags.classifier(["normal", "tumour"])
    assert isinstance(model, ClassifierModel)
    model.head.grow(2)
    bag = torch.randn(17, 1024)
    assert model(bag).shape == (17, 2)  # instance logits; a MIL strategy pools them
    assert torch.equal(model.backbone(bag), bag)
    assert bags.pass_modules(model) == [] and bags.num_parameters() == 0


def test_the_stem_counts_passes_in_the_classifier_and_in_a_restored_copy():
    build = BACKBONES.get("micro_vit")
    vit = build(build.Config(pretrained="none"))
    assert vit.stem == "patch_embed" and vit.accepts((1, 16, 16))
    model = vit.classifier(["0", "1"])
    (stem,) = vit.pass_modules(model)
    assert stem is model.backbone.patch_embed
    restored = copy.deepcopy(model)  # e.g. a strategy unpickled from a checkpoint
    (again,) = vit.pass_modules(restored)
    assert again is restored.backbone.patch_embed and again is not stem
