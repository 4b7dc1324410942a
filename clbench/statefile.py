"""State files: a tree of JSON values and tensors in one safetensors file.

A run checkpoint (and any other state clbench must read back) is *data*: the tensors go
into a safetensors file and everything else (numbers, strings, lists, mappings) into a
JSON document stored in the same file's metadata, where each tensor is a
``{"__tensor__": key}`` placeholder. Loading parses JSON and copies raw tensor bytes;
nothing in the file is ever executed, unlike a pickled checkpoint.

Supported leaves: ``None``, ``bool``, ``int``, ``float`` (NaN and infinities included),
``str``, ``torch.Tensor`` and ``numpy.ndarray`` (restored as what it was). Containers:
``dict`` with string keys, ``list`` and ``tuple`` (read back as lists). Anything else is
refused when saving, naming its path in the tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clbench.errors import ClbenchError, first_line

FORMAT = "clbench-state/1"
_TENSOR = "__tensor__"


def encode(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` -> (its JSON skeleton, the tensors the skeleton's placeholders name)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, torch.Tensor | np.ndarray):
            key = f"t{len(tensors)}"
            is_numpy = isinstance(value, np.ndarray)
            t = torch.from_numpy(np.ascontiguousarray(value)) if is_numpy else value
            # a private contiguous CPU copy: safetensors refuses shared or strided storage
            tensors[key] = t.detach().to("cpu").contiguous().clone()
            return {_TENSOR: key, "numpy": True} if is_numpy else {_TENSOR: key}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"state key {path}[{k!r}] is not a string")
                if k == _TENSOR:
                    raise TypeError(f"state key {path}[{k!r}] is reserved")
                out[k] = walk(v, f"{path}.{k}")
            return out
        if isinstance(value, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        raise TypeError(f"state value {path} is a {type(value).__name__}, not data")

    return walk(tree, "state"), tensors


def decode(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            t = tensors[skeleton[_TENSOR]]
            return t.numpy() if skeleton.get("numpy") else t
        return {k: decode(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [decode(v, tensors) for v in skeleton]
    return skeleton


def save(path: Path, tree: Any) -> None:
    """Write ``tree`` to ``path`` atomically (a temporary file beside it, then a rename).

    A failed write (full disk, no permission) leaves no temporary file behind and any
    earlier file at ``path`` intact, and is one line (ClbenchError).
    """
    from safetensors.torch import save_file

    from clbench.record import describe_os_error

    skeleton, tensors = encode(tree)
    meta = {"format": FORMAT, "tree": json.dumps(skeleton, allow_nan=True)}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ClbenchError(f"cannot write {path}: {describe_os_error(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path, device: str | torch.device = "cpu") -> Any:
    """Read a tree written by :func:`save`; a file that is not one is one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ClbenchError(
                    f"{path} is not a clbench state file (format {meta.get('format')!r}, "
                    f"expected {FORMAT!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        skeleton = json.loads(meta["tree"])
        return decode(skeleton, tensors)
    except ClbenchError:
        raise
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
        raise ClbenchError(
            f"{path} is corrupt or not a clbench state file: {first_line(e)}"
        ) from None
