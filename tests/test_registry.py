"""Third-party strategies plug in through the `clbench.strategies` entry-point group."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from helpers import FAST, clbench_with

PLUGIN = '''
"""A tiny external strategy package."""
from dataclasses import dataclass

from clbench.strategies.base import CLStrategy, StrategyConfig


@dataclass
class HeadOnlyConfig(StrategyConfig):
    epochs: int = 1
    lr: float = 0.05


class HeadOnly(CLStrategy):
    """Third-party test strategy: trains only the head with its own schema."""

    Config = HeadOnlyConfig

    def prepare_model(self, model):
        model.backbone.requires_grad_(False)
'''


def _install_fake_distribution(root: Path) -> None:
    """A dist-info folder with an entry point, exactly what pip would leave behind."""
    (root / "my_cl_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "my_cl_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-cl-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[clbench.strategies]\nhead_only = my_cl_plugin:HeadOnly\n"
    )


def _clbench(args: list[str], root: Path, cwd: Path) -> subprocess.CompletedProcess:
    return clbench_with(args, root, cwd)


def test_entry_point_strategy_is_listed_and_runnable(tmp_path):
    plugin_root = tmp_path / "site"
    plugin_root.mkdir()
    _install_fake_distribution(plugin_root)

    listed = _clbench(["list"], plugin_root, tmp_path)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if " head_only " in ln)
    assert "Third-party test strategy" in line and "(from my-cl-plugin)" in line

    ran = _clbench(
        ["run", *FAST, "strategy=head_only", "strategy.lr=0.02", f"runs_dir={tmp_path / 'runs'}"],
        plugin_root,
        tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    run_dir = Path(ran.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    import json

    res = json.loads((run_dir / "results.json").read_text())
    assert res["strategy"] == "head_only"
    assert res["config"]["strategy"]["lr"] == 0.02  # override reached the plugin's schema
    assert res["config"]["strategy"]["epochs"] == 1
    head_params = res["efficiency"]["trainable_params"]
    assert 0 < head_params < res["efficiency"]["backbone_params"]


def test_registry_lists_builtins_without_plugins():
    from clbench.registry import STRATEGIES

    assert {"finetune", "joint", "linear_probe", "lora"} <= set(STRATEGIES.names())


@pytest.mark.parametrize("group", ["strategy", "scenario", "backbone"])
def test_every_shipped_yaml_states_every_option_of_its_schema(group):
    """A YAML in conf/GROUP lists exactly its component's Config fields, so every option
    is overridable from the command line and documented where users look."""
    import dataclasses

    from omegaconf import OmegaConf

    from clbench.config import CONF_DIR
    from clbench.registry import REGISTRIES

    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        schema = REGISTRIES[group].get(node.name).Config
        fields = {f.name for f in dataclasses.fields(schema)}
        keys = set(node.keys()) - {"defaults"}  # a scenario's default backbone / strategy
        assert keys == fields, (path.name, fields ^ keys)
