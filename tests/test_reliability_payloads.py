"""No loader executes code from data: a malicious pickle (its ``__reduce__`` runs a shell
command that would create a marker file) planted where each loader reads is refused in
one line, exit code 2, and the marker never appears. Loaders: a CIFAR python batch, a
CIFAR-10-C .npy, a WideResNet checkpoint (``torch.save`` zip and a bare pickle), a CLIP
weights file, the cached source model and the cached pretrained micro ViT (safetensors).
The run checkpoint (``clbench resume``) has its own tests."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_reliability_inputs import (
    NO_TRAINING,
    SOURCE_MODEL_RUN,
    one_error_line,
    plant_source_model_cache,
)

from helpers import run_cli


class Payload:
    """Unpickled, it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a loader ran code from the data"


def payload_bytes(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(Payload(marker), protocol=protocol)


def test_the_payload_is_live(tmp_path):
    """Unpickled plainly, the payload does run (so the refusals below mean something)."""
    live = tmp_path / "live"
    pickle.loads(payload_bytes(live))
    assert live.exists()


def test_cifar_batch(tmp_path, capsys, marker):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Payload(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    args = ["run", "tracking=none", "progress=false", "scenario=cifar10_c"]
    args += [f"scenario.cifar_root={tmp_path / 'cifar'}", "scenario.corruptions=[fog]"]
    assert run_cli([*args, f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"cannot read {folder / 'test_batch'}: refused to unpickle posix.system: a CIFAR batch "
        "holds only dicts, lists, bytes, numbers and numpy arrays; expected the CIFAR python "
        "release (a pickled dict)"
    )


def test_cifar_batch_reader_still_reads_a_real_layout(tmp_path):
    """What the python release holds (protocol 2 from Python 2: bytes keys, lists, a uint8
    array) and protocol 5 are admitted."""
    from clbench.scenarios.corrupted_data import load_cifar_test

    from clbench.errors import ClbenchError

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 4, 5):
        batch = {
            b"filenames": [b"a.png", b"b.png"],
            b"batch_label": b"testing batch 1 of 1",
            b"fine_labels": [3, 7],
            b"coarse_labels": [1, 2],
            b"data": data,
        }
        (folder / "test").write_bytes(pickle.dumps(batch, protocol=protocol))
        x, y = load_cifar_test(tmp_path, "cifar100")
        assert x.shape == (2, 32, 32, 3) and y.tolist() == [3, 7]
        assert np.array_equal(x.transpose(0, 3, 1, 2).reshape(2, -1), data)
    (folder / "test").write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")  # only latin1
    with pytest.raises(ClbenchError, match=r"unpickle _codecs.encode\(\.\.\., 'rot13'\)"):
        load_cifar_test(tmp_path, "cifar100")


def test_cifar_c_npy_holding_a_pickle(tmp_path, capsys, marker):
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    objects = np.empty((5, 32, 32, 3), dtype=object)
    objects[0, 0, 0, 0] = Payload(marker)
    np.save(root / "fog.npy", objects, allow_pickle=True)
    np.save(root / "labels.npy", np.zeros(5, np.uint8))
    args = ["run", "tracking=none", "progress=false", "scenario=cifar10_c", f"scenario.root={root}"]
    assert run_cli([*args, "scenario.corruptions=[fog]", f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"cannot read {root / 'fog.npy'}: it holds Python objects (a pickle), which are never "
        "loaded; expected a numeric .npy array"
    )


@pytest.mark.parametrize("form", ["torch.save", "pickle"])
def test_wideresnet_checkpoint(tmp_path, capsys, marker, form):
    import torch

    path = tmp_path / "Standard.pt"
    if form == "torch.save":
        torch.save({"state_dict": {"conv1.weight": Payload(marker)}}, path)
    else:
        path.write_bytes(payload_bytes(marker))
    args = ["run", *NO_TRAINING, "backbone=wrn_16_2", f"backbone.checkpoint={path}"]
    assert run_cli([*args, f"runs_dir={tmp_path / 'runs'}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"cannot read WideResNet checkpoint {path}: ")
    assert line.endswith("; expected a state dict saved with torch.save")
    if form == "torch.save":
        assert "refused to unpickle posix.system (only tensors are loaded, no code is run)" in line


def test_cached_source_model(tmp_path, capsys, monkeypatch, marker):
    planted = plant_source_model_cache(monkeypatch, payload_bytes(marker, protocol=4))
    assert run_cli(["run", *SOURCE_MODEL_RUN, f"runs_dir={tmp_path / 'runs'}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"the cached source model {planted[0]} is corrupt (SafetensorError: ")
    assert "delete it and run again: it is retrained" in line


def test_cached_pretrained_backbone(tmp_path, capsys, monkeypatch, marker):
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    from clbench.pretrain.train import DEFAULT_STEPS, default_checkpoint_path

    path = default_checkpoint_path(0, DEFAULT_STEPS)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload_bytes(marker))
    assert run_cli(["run", *NO_TRAINING, f"runs_dir={tmp_path / 'runs'}"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"unreadable micro ViT checkpoint {path}: ")
    assert line.endswith(f"clbench pretrain --seed 0 --steps {DEFAULT_STEPS} --force")


def test_micro_vit_weights_file_given_by_path(tmp_path, capsys, marker):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(payload_bytes(marker))
    args = ["run", *NO_TRAINING, f"backbone.pretrained={path}", f"runs_dir={tmp_path / 'runs'}"]
    assert run_cli(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"unreadable micro ViT checkpoint {path}: ")
    assert line.endswith("give backbone.pretrained=glyphs, none, or a micro ViT .safetensors file")


def test_clip_weights_file(tmp_path, capsys, marker):
    """open_clip reads a local weights file with ``torch.load(weights_only=True)``."""
    import torch

    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"visual.proj": Payload(marker)}, path)
    args = ["run", "tracking=none", "progress=false", "backbone=clip_vit_b16"]
    args += [f"backbone.pretrained={path}", "backbone.quick_gelu=true"]
    assert run_cli([*args, f"runs_dir={tmp_path / 'runs'}"]) == 2
    assert one_error_line(capsys) == (
        f"cannot load CLIP weights '{path}' for ViT-B-16: refused to unpickle posix.system (only "
        "tensors are loaded, no code is run); give backbone.pretrained=<open_clip tag> on a "
        "connected machine or the path of a weights file"
    )
