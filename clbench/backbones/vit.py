"""The papers' backbone: timm's ViT-B/16 (ImageNet-21k weights by default).

``vit_b16`` is timm's ``VisionTransformer`` itself, so its module names are the ones
clbench's adapters target (``blocks[i].attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``; ``cls_token``, ``pos_embed``, ``norm`` for the prompt learners). It returns
the final-norm CLS token (``num_classes=0``, ``global_pool="token"``), the feature the
official InfLoRA and PILOT code classify.

Weights (``backbone.pretrained``):

- ``hub``: the timm tag's weights (``vit_base_patch16_224.augreg_in21k``): from the
  Hugging Face cache if they are there (no network then), otherwise downloaded from the
  hub on a connected machine; offline and not cached, one error line says where to put a
  local file;
- ``none``: random initialisation (from the global torch seed);
- the path of a local ``.safetensors`` file or a weights-only torch file (a state dict;
  ``{"state_dict": ...}`` / ``{"model": ...}`` and DataParallel's ``module.`` prefix are
  unwrapped): nothing is unpickled but tensors.

Either way the state dict goes through timm's ``checkpoint_filter_fn`` (position
embeddings resampled to ``img_size``, old layouts converted), the classifier ``head`` is
dropped, and every remaining key must fit (one line naming the missing / unexpected keys).
``data_config`` is timm's data config of the tag (mean / std 0.5 for the augreg weights,
bicubic, crop_pct 0.9), with ``input_size`` the size the model is built at; with
``normalize=false`` mean 0 and std 1 (images in [0, 1], as the official InfLoRA and PILOT
transforms feed the ViT: ``ToTensor()`` without ``Normalize``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from clbench.backbones.base import Backbone, torch_load_failure, unwrap_state_dict
from clbench.checks import check_positive, check_probability, tcp_unreachable
from clbench.errors import ClbenchError, ConfigError, first_line

#: the files a timm Hugging Face repository holds weights in, in the order tried
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
SPECIAL = ("hub", "none")


@dataclass
class ViTConfig:
    name: str = "vit_b16"
    model: str = "vit_base_patch16_224"  # a timm VisionTransformer architecture
    # the timm weights tag (also sets the data config); "": timm's default tag of model
    tag: str = "augreg_in21k"
    # hub (timm's weights of model.tag: the Hugging Face cache, or downloaded), none
    # (random init), or the path of a .safetensors / weights-only torch state dict
    pretrained: str = "hub"
    img_size: int | None = None  # build at this input size (None: the architecture's)
    drop_path_rate: float = 0.0  # stochastic depth while training
    # images normalised with the tag's mean / std (timm's data config); false: left in
    # [0, 1] (mean 0, std 1), what the official InfLoRA / PILOT transforms feed the ViT
    normalize: bool = True

    def __post_init__(self) -> None:
        if "." in self.model:
            arch, _, tag = self.model.partition(".")
            raise ConfigError(
                f"invalid value for backbone.model: {self.model!r}; give the architecture and "
                f"the weights tag apart: backbone.model={arch} backbone.tag={tag}"
            )
        if self.img_size is not None:
            check_positive("backbone.img_size", self.img_size)
        check_probability("backbone.drop_path_rate", self.drop_path_rate)


def _tags(model: str) -> list[str]:
    import timm

    return [n.partition(".")[2] for n in timm.list_pretrained(f"{model}.*")]


def timm_name(cfg: ViTConfig) -> str:
    """``model.tag`` (``model`` alone for the empty tag: timm's default tag)."""
    return f"{cfg.model}.{cfg.tag}" if cfg.tag else cfg.model


def _check_names(cfg: ViTConfig) -> None:
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(cfg.model):
        raise ConfigError(
            f"invalid value for backbone.model: {cfg.model!r} is not a timm model; give a "
            "timm ViT architecture, e.g. vit_base_patch16_224, vit_small_patch16_224, "
            "vit_tiny_patch16_224"
        )
    try:
        known = get_pretrained_cfg(timm_name(cfg)) is not None
    except RuntimeError:  # timm's "Invalid pretrained tag"
        known = False
    if not known:
        tags = [*_tags(cfg.model), "'' (timm's default)"]
        raise ConfigError(
            f"invalid value for backbone.tag: {cfg.tag!r} is not a timm weights tag of "
            f"{cfg.model}; valid choices: {', '.join(tags)}"
        )


def build_vit(cfg: ViTConfig) -> nn.Module:
    """The randomly initialised timm ViT of ``cfg`` (CLS features, no classifier)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "global_pool": "token",
        "drop_path_rate": cfg.drop_path_rate,
    }
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    try:
        module = timm.create_model(timm_name(cfg), **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        with torch.device("meta"):  # what the architecture is, without initialising it
            kind = type(timm.create_model(cfg.model, pretrained=False))
        if not issubclass(kind, VisionTransformer):
            raise _not_a_vit(cfg.model, kind) from None
        raise ConfigError(
            f"cannot build {cfg.model} as a ViT feature extractor (CLS token, "
            f"img_size={cfg.img_size}): {first_line(e)}"
        ) from None
    if not isinstance(module, VisionTransformer):
        raise _not_a_vit(cfg.model, type(module))
    patch = tuple(module.patch_embed.patch_size)
    if min(module.patch_embed.grid_size) < 1:
        raise ConfigError(
            f"invalid value for backbone.img_size: {cfg.img_size}; {cfg.model} needs at least "
            f"one {patch[0]} x {patch[1]} patch (img_size >= {max(patch)})"
        )
    return module


def _not_a_vit(model: str, kind: type) -> ConfigError:
    return ConfigError(
        f"invalid value for backbone.model: {model!r} is a timm {kind.__name__}, not a "
        "VisionTransformer; give a ViT architecture, e.g. vit_base_patch16_224"
    )


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it
    once, when it is imported)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def hub_weights(model: str, tag: str) -> tuple[Path, str]:
    """The local file of timm's ``model.tag`` weights (``tag`` "": timm's default) and its
    provenance: taken from the Hugging Face cache when it is there (no network), else
    downloaded from the hub; one :class:`ClbenchError` line when it is neither cached nor
    reachable."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(f"{model}.{tag}" if tag else model)
    tag = tag or (pcfg.tag if pcfg is not None else "") or ""
    repo = (pcfg.hf_hub_id or "") if pcfg is not None else ""
    if not repo:
        raise ClbenchError(
            f"timm has no Hugging Face weights for {model}.{tag}; download them yourself and "
            "give backbone.pretrained=/path/to/weights.safetensors"
        )
    repo, _, revision = repo.partition("@")
    files = (pcfg.hf_hub_filename,) if pcfg.hf_hub_filename else HUB_FILES
    cache = _hub_cache_dir()
    for name in files:
        found = try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            return Path(found), _provenance(model, tag, repo, Path(found))
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = urlparse(endpoint)
    why = "offline mode (HF_HUB_OFFLINE)" if _offline() else None
    if why is None:
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        reason = tcp_unreachable(host, port, timeout=5.0)
        why = None if reason is None else f"{host} unreachable: {reason}"
    if why is not None:
        raise ClbenchError(
            f"the {model}.{tag} weights are not in the Hugging Face cache ({cache}) and the "
            f"hub cannot be reached ({why}); on a connected machine run once with "
            f"backbone.pretrained=hub (or copy that cache here), or download "
            f"{endpoint.rstrip('/')}/{repo}/resolve/main/{files[0]} and give "
            f"backbone.pretrained=/path/to/{files[0]}"
        )
    last: Exception | None = None
    for name in files:
        try:
            path = hf_hub_download(repo, name, revision=revision or None, cache_dir=cache)
        except Exception as e:  # a missing file (try the next one), a failed download
            last = e
            continue
        return Path(path), _provenance(model, tag, repo, Path(path))
    raise ClbenchError(
        f"cannot download the {model}.{tag} weights from {repo}: "
        f"{first_line(last) if last else 'no weights file'}; download them yourself and give "
        "backbone.pretrained=/path/to/weights.safetensors"
    )


def _provenance(model: str, tag: str, repo: str, path: Path) -> str:
    """``timm:model.tag (hf:repo@commit)``: the snapshot directory is named by its commit."""
    commit = path.parent.name if path.parent.parent.name == "snapshots" else "?"
    return f"timm:{model}.{tag} (hf:{repo}@{commit[:12]})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` of a ``.safetensors`` file or a weights-only torch file (tensors
    only: a pickle that would build anything else is refused, not run); one error line."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:  # a JSON header and raw tensors: nothing is unpickled
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ClbenchError(
                f"cannot read ViT weights {str(path)!r}: {first_line(e)}; expected a "
                ".safetensors file of the model's tensors"
            ) from None
    try:  # weights_only: the unpickler builds tensors and containers, never calls code
        with warnings.catch_warnings():  # its notes on pickle protocols: one error line only
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle of anything but tensors
        raise ClbenchError(
            f"cannot read ViT weights {str(path)!r}: {torch_load_failure(e)}; expected a state "
            "dict saved with torch.save, or a .safetensors file"
        ) from None
    weights = unwrap_state_dict(state)
    if weights is None:
        raise ClbenchError(
            f"{str(path)!r} is not a state dict (a mapping of parameter names to tensors, or "
            "{'state_dict': ...} / {'model': ...})"
        )
    return weights


def _few(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:3])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > 3 else ''})"


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str) -> None:
    """Load ``state`` into the timm ViT ``module``: timm's checkpoint filter (position
    embeddings resampled to the model's grid, old layouts converted), the classifier
    dropped (the backbone has none), then every key must fit; one error line otherwise."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    head = str(module.pretrained_cfg.get("classifier") or "head")
    state = {k: v for k, v in state.items() if k != head and not k.startswith(head + ".")}
    try:
        state = checkpoint_filter_fn(state, module)
        missing, unexpected = module.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]
        raise ClbenchError(f"{what} does not fit {arch}: {detail}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(list(missing))}")
        if unexpected:
            parts.append(f"unexpected keys {_few(list(unexpected))}")
        raise ClbenchError(
            f"{what} does not fit {arch}: {'; '.join(parts)}; give the weights of that "
            "architecture (backbone.model) or set backbone.model to the file's"
        )


def vit_b16(cfg: ViTConfig) -> Backbone:
    """timm ViT-B/16 (or any timm ViT named by ``cfg.model``): hub, local file or random."""
    from timm.data import resolve_data_config

    _check_names(cfg)
    if cfg.pretrained == "none":
        module = build_vit(cfg)
        source = f"random-init({cfg.model})"
    else:
        if cfg.pretrained == "hub":
            path, source = hub_weights(cfg.model, cfg.tag)
            what = f"the {timm_name(cfg)} weights {str(path)!r}"
        else:
            path = Path(cfg.pretrained).expanduser()
            if not path.is_file():
                raise ClbenchError(
                    f"ViT weights file not found: {str(path)!r}; backbone.pretrained takes hub "
                    f"(timm's {timm_name(cfg)}), none, or the path of a .safetensors / "
                    "weights-only torch file"
                )
            source, what = str(path), f"{str(path)!r}"
        state = read_state_dict(path)
        with torch.random.fork_rng(devices=[]):  # random init is overwritten; spare caller RNG
            module = build_vit(cfg)
        load_weights(module, state, what, cfg.model)
    data_config = dict(resolve_data_config({}, model=module))
    if not cfg.normalize:
        data_config["mean"], data_config["std"] = (0.0,) * 3, (1.0,) * 3
    grid = module.patch_embed.img_size
    data_config["input_size"] = (int(module.patch_embed.proj.in_channels), *map(int, grid))
    shape = tuple(data_config["input_size"])
    return Backbone(
        name="vit_b16" if cfg.model == ViTConfig.model else cfg.model,
        module=module.eval(),
        feature_dim=int(module.num_features),
        input_shape=shape,
        source=source,
        stem="patch_embed",
        data_config=data_config,
    )


vit_b16.Config = ViTConfig  # type: ignore[attr-defined]
