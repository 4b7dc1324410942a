"""Hydra config: composition, validation against the registered schemas, and typing.

Every override is checked before Hydra runs a job, so a bad override is one line
(what is wrong, the value, the valid choices) and exit code 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clbench.checks import (
    check_choice,
    check_positive,
    check_probability,
    check_seed,
    check_tracking_uri,
)
from clbench.errors import ClbenchError, ConfigError, unknown_choice
from clbench.precision import PRECISIONS, check_precision
from clbench.registry import REGISTRIES

if TYPE_CHECKING:
    import torch

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
if not (CONF_DIR / "config.yaml").is_file():  # installed wheel: conf/ is package data
    import clbench.conf

    CONF_DIR = Path(clbench.conf.__file__).resolve().parent

#: config groups whose option selects a registered component
COMPONENT_GROUPS = ("strategy", "scenario", "backbone")
MAX_VALIDATED_COMBINATIONS = 64


def group_options(group: str) -> list[str]:
    """Options of a config group: YAML files in conf/GROUP plus registered components."""
    names = _yaml_names(group)
    if group in REGISTRIES:
        names |= set(REGISTRIES[group].names())  # names only: imports no component
    return sorted(names)


def _yaml_names(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


#: (group, name) of the config nodes already stored in Hydra's ConfigStore
_STORED: set[tuple[str, str]] = set()


def register_plugin_configs() -> None:
    """Give third-party components without a YAML file a config node built from their schema.

    Only plugin components without a YAML in conf/GROUP are imported (the check is by
    name, before loading); a plugin that cannot be imported is skipped here and is a
    one-line error if a run names it (:func:`compose`). Built-ins are not imported: the
    node of one without a YAML of its name (``backbone=wideresnet``) is made when an
    override selects it (:func:`compose`).
    """
    for group in COMPONENT_GROUPS:
        have_yaml = _yaml_names(group)
        for entry in REGISTRIES[group]:
            if entry.name in have_yaml or not entry.is_plugin:
                continue
            try:
                _store_config_node(group, entry.name)
            except ConfigError:
                raise
            except ClbenchError:  # cannot be imported: an error if a run names it
                continue


def _store_config_node(group: str, name: str) -> None:
    """Store the config node of component ``name`` (which has no YAML) in Hydra's store."""
    if (group, name) in _STORED:
        return
    from hydra.core.config_store import ConfigStore

    entry = REGISTRIES[group].entry(name)
    schema = getattr(entry.load(), "Config", None)
    if schema is None:
        raise ConfigError(f"{group} {entry.name!r} ({entry.source}) has no Config schema")
    node = OmegaConf.structured(schema)
    node.name = entry.name
    ConfigStore.instance().store(group=group, name=entry.name, node=node)
    _STORED.add((group, name))


def _store_selected_nodes(overrides: Sequence[str]) -> None:
    """Config nodes for the components without a YAML that the overrides select."""
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in COMPONENT_GROUPS and value not in _yaml_names(key) and value in REGISTRIES[key]:
            _store_config_node(key, value)


def typed(group: str, node: DictConfig) -> Any:
    """The component's Config dataclass instance for a composed group node (validated)."""
    component = REGISTRIES[group].get(node.name)
    schema = component.Config
    try:
        # resolved where it sits, so an option may interpolate another group's value (an
        # aggregator's in_dim is ${oc.select:scenario.feature_dim,1024})
        data = OmegaConf.to_container(node, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(group, e, schema)) from None


def _omegaconf_message(group: str, e: OmegaConfBaseException, schema: type) -> str:
    prefix = f"{group}." if group else ""
    key = f"{prefix}{e.full_key}" if getattr(e, "full_key", None) else group
    fields = sorted(f.name for f in dataclasses.fields(schema))
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or ("Key '" in msg and "not" in msg):
        return f"unknown key {key!r}; valid keys: {', '.join(prefix + f for f in fields)}"
    if "converted to" in msg:
        expected = msg.rpartition("converted to ")[2].strip().lower()
    elif "valid bool" in msg:
        expected = "a boolean (true or false)"
    else:
        expected = msg
    return f"invalid value for {key}: {getattr(e, 'value', None)!r}; expected {expected}"


@dataclasses.dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "clbench"
    # further attempts after a failed upload (1 s, 2 s, 4 s... apart): a busy SQLite store,
    # a server restarting. A failed attempt's MLflow run ends as FAILED and is ignored by
    # the leaderboard.
    retries: int = 2
    # seconds one HTTP request to a tracking server may take (MLflow's default: 120 s, and
    # 7 retries of its own, which clbench turns off unless the environment sets them)
    timeout: int = 5


@dataclasses.dataclass
class RunConfig:
    """Schema of the top-level keys of conf/config.yaml (component groups checked apart)."""

    seed: int = 0
    device: str = "cpu"
    # fp32 | bf16 | fp16 (CUDA only): the learner's forward passes under torch.autocast
    # (clbench.precision)
    precision: str = "fp32"
    # deterministic algorithms, cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG (clbench.precision)
    deterministic: bool = True
    progress: bool = True
    runs_dir: str = "runs"
    checkpoint: bool = True
    # torch's intra- and inter-op threads; None: OMP_NUM_THREADS if set, else the cores this
    # process may use, at most 16 (clbench.resources.default_threads)
    threads: int | None = None
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check a composed config; returns {group: typed Config} for the component groups."""
    top = {k: cfg[k] for k in cfg if k not in (*COMPONENT_GROUPS, "hydra")}
    try:
        run = OmegaConf.merge(OmegaConf.structured(RunConfig), top)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message("", e, RunConfig)) from None
    check_seed("seed", run.seed)
    check_choice("precision", run.precision, PRECISIONS)
    if run.threads is not None:
        check_positive("threads", run.threads)
    check_positive("tracking.retries", run.tracking.retries, allow_zero=True)
    check_positive("tracking.timeout", run.tracking.timeout)
    check_tracking_uri("tracking.uri", run.tracking.uri)
    out = {}
    for group in COMPONENT_GROUPS:
        node = cfg.get(group)
        if node is None or "name" not in node:
            raise ConfigError(f"config has no {group} (expected {group}=NAME)")
        if node.name not in REGISTRIES[group]:
            raise unknown_choice(group, node.name, REGISTRIES[group].names())
        out[group] = typed(group, node)
        check_conventional_fields(group, out[group])
    device = resolve_device(str(run.device))
    check_precision(str(run.precision), device, str(run.device))
    return out


def check_conventional_fields(prefix: str, obj: Any) -> None:
    """Check the fields a component's schema names by convention, whatever the component:
    ``seed`` / ``*_seed`` are seeds (:func:`~clbench.checks.check_seed`), ``dropout`` /
    ``*_dropout`` probabilities in [0, 1). Nested dataclasses are checked too."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if f.name == "seed" or f.name.endswith("_seed"):
            if is_number:
                check_seed(key, int(value))
        elif f.name == "dropout" or f.name.endswith("_dropout"):
            if is_number:
                check_probability(key, value)
        else:
            check_conventional_fields(key, value)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if present) -> a torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "valid choices: cpu, cuda, cuda:N, auto"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid value for device: {name!r}; {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"invalid value for device: {name!r}; {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"invalid value for device: {name!r}; no CUDA device here (cpu, auto)")
    return device


def _expand(overrides: Sequence[str]) -> list[list[str]]:
    """Sweep overrides ("a=1,2") -> one override list per job (capped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # hydra's OverrideParseException has a multi-line message
        raise ConfigError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    combos = list(itertools.islice(itertools.product(*choices), MAX_VALIDATED_COMBINATIONS))
    if len(combos) == MAX_VALIDATED_COMBINATIONS:  # too many: check each value once
        combos = [
            tuple(c[min(j, len(c) - 1)] if k == i else c[0] for k, c in enumerate(choices))
            for i, cs in enumerate(choices)
            for j in range(len(cs))
        ]
    return [list(c) for c in combos]


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose conf/config.yaml with overrides (no sweeps) into a resolved config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    _check_group_choices(overrides)
    _store_selected_nodes(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_message(e, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def compose_hydra(overrides: Sequence[str]) -> DictConfig:
    """Hydra's own node (``hydra.*``: launcher, sweeper, dirs) for ``hydra...`` overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        missing = re.search(r"Could not find '(hydra/[\w/]+)/([^']*)'", lines[0] if lines else "")
        if missing and "Available options" in str(e):
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
            rest = lines[start + 1 :]
            options = list(itertools.takewhile(lambda ln: not ln.endswith(":"), rest))
            raise unknown_choice(missing.group(1), missing.group(2), options) from None
        raise ConfigError(f"bad override: {' '.join(lines) or type(e).__name__}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg.hydra


def _check_group_choices(overrides: Sequence[str]) -> None:
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if (key in COMPONENT_GROUPS or key == "tracking") and value not in group_options(key):
            raise unknown_choice(key, value, group_options(key))
        if key == "experiment":  # conf/experiment: a paper configuration, added to the defaults
            names = sorted(_yaml_names("experiment"))
            if not o.startswith("+"):
                raise ConfigError(
                    f"{o!r}: an experiment is added with a leading +, e.g. +experiment={value}"
                )
            if value not in names:
                raise unknown_choice("experiment", value, names)


def _hydra_message(e: Exception, overrides: Sequence[str]) -> str:
    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    if "not in struct" in msg or "Could not override" in first:
        key = first.split("'")[1] if "'" in first else first
        parent = key.rpartition(".")[0]
        others = [o for o in overrides if not o.lstrip("+~").startswith(key)]
        valid = _valid_keys(parent, others)
        return f"unknown key {key!r}; valid keys: {', '.join(valid)}"
    if "Could not find" in first or "Could not load" in first:
        return first.replace("In 'config': ", "")
    return f"bad override: {first}"


def _valid_keys(parent: str, overrides: Sequence[str]) -> list[str]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node]


def check_overrides(overrides: Sequence[str]) -> list[DictConfig]:
    """Validate every job a (possibly sweeping) override list would run; raise ConfigError.

    Returns the composed configs (at most ``MAX_VALIDATED_COMBINATIONS`` distinct ones).
    """
    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    configs = []
    for job in _expand(user):
        cfg = compose(job)
        validate(cfg)
        configs.append(cfg)
    return configs


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict copy of a config (without Hydra's own node)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data
