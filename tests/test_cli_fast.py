"""Fast paths of the command line: listing, help and one-line errors import no component.

``clbench list``, ``clbench --help`` and an unknown strategy, scenario or key must not
import torch, avalanche or mlflow (they took 12-13 s when listing imported every
strategy). Each check runs in a fresh interpreter and reads its ``sys.modules``.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "avalanche", "mlflow")

_PROBE = f"""
import json, sys
from clbench.cli import main
code = main(sys.argv[1:])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("HEAVY=" + json.dumps(heavy))
sys.exit(code)
"""


def _python(code: str, args: list[str], cwd: Path, env: dict | None = None):
    """``python -c CODE ARGS`` in a fresh interpreter -> the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _clbench(args: list[str], cwd: Path, pythonpath: Path | None = None):
    """``clbench ARGS`` in a fresh interpreter -> (exit code, stdout lines, stderr lines,
    heavy modules it imported)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    p = _python(_PROBE, args, cwd, env)
    out = p.stdout.splitlines()
    heavy = None
    if out and out[-1].startswith("HEAVY="):
        heavy = json.loads(out.pop().removeprefix("HEAVY="))
    return p.returncode, out, p.stderr.splitlines(), heavy


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["list"], 0, None),
        (["--help"], 0, None),
        (["run", "strategy=nope"], 2, "unknown strategy 'nope'; valid choices: "),
        (["run", "scenario=nope"], 2, "unknown scenario 'nope'; valid choices: "),
        (["run", "strategy.nope=1"], 2, "unknown key 'strategy.nope'; valid keys: "),
        (["run", "threads=0"], 2, "invalid value for threads: 0; must be > 0"),
        (["sync", "nope"], 2, "not a finished run directory (no results.json): nope"),
    ],
)
def test_fast_paths_import_no_heavy_module(tmp_path, args, code, expected):
    rc, out, err, heavy = _clbench(args, tmp_path)
    assert rc == code, err
    assert heavy == [], f"clbench {' '.join(args)} imported {heavy}"
    if expected is None:
        assert out and not err, err
    else:
        assert len(err) == 1, err
        assert err[0].startswith("error: ") and expected in err[0], err[0]
    assert not list(tmp_path.rglob("*.json"))  # nothing ran


def test_list_into_a_closed_pipe_stops_quietly(tmp_path):
    """``clbench list | head -1``: the reader goes away; no traceback, exit code 1."""
    code = "import sys; from clbench.cli import main; sys.exit(main(['list']))"
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    assert p.stdout.readline().startswith(b"strategy ")
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 1 and "Traceback" not in err and "Broken" not in err, err


#: what the default job (micro ViT on split_digits) must not import: CLIP, and the engines
#: of the Hydra launchers it does not use (Hydra's plugin modules themselves are thin;
#: joblib comes with scikit-learn, which the digits need)
NEVER = ("open_clip", "ray", "submitit")
_JOB_PROBE = f"""
import json, sys
from clbench.cli import main
from clbench.deferred import is_loaded
from clbench.protocols.class_incremental import ClassIncremental

seen = {{}}
plots = ClassIncremental.plots

def probe(self, record, run_dir):
    seen["at_plots"] = sorted(m for m in sys.modules if m == "clbench.plots")
    return plots(self, record, run_dir)

ClassIncremental.plots = probe
code = main(sys.argv[1:])
tops = {{m.split(".")[0] for m in sys.modules}}
seen["never"] = sorted(tops & set({NEVER!r}))
seen["qpsolvers"] = is_loaded("qpsolvers")
seen["plots"] = "clbench.plots" in sys.modules
print("SEEN=" + json.dumps(seen))
sys.exit(code)
"""


def test_the_default_job_imports_only_what_it_uses(tmp_path, pretrained):
    """The micro ViT on split_digits: no open_clip, Ray or submitit; GEM's QP solvers
    deferred (never loaded); clbench's plotting imported when the run plots, not before."""
    args = ["run", "progress=false", f"runs_dir={tmp_path}", "strategy.epochs=1"]
    args.append(f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    p = _python(_JOB_PROBE, args, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout.splitlines()[-1].removeprefix("SEEN="))
    assert seen["never"] == [], seen
    assert seen["qpsolvers"] is False, seen
    assert seen["at_plots"] == [] and seen["plots"] is True, seen


def test_list_shows_every_builtin_with_its_summary_and_kind(tmp_path):
    """The listing (read from source) says what the imported components say."""
    from clbench.registry import PROTOCOLS, REGISTRIES

    rc, out, err, heavy = _clbench(["list"], tmp_path)
    assert rc == 0 and heavy == [], err
    lines = {(ln[:9].strip(), ln[10:].split()[0]): ln for ln in out}
    for kind, reg in REGISTRIES.items():
        builtins = [e for e in reg if e.source == "builtin"]
        assert builtins
        for e in builtins:
            line = lines[(kind, e.name)]
            obj = e.load()
            summary = (inspect.getdoc(obj) or "").strip().splitlines()[0]
            assert summary and summary in line, (line, summary)
            if kind == "strategy":
                scenario_kind = getattr(obj, "kind", None)
                if not isinstance(scenario_kind, str):  # before every base declares `kind`
                    scenario_kind = ", ".join(getattr(obj, "protocols", ()))
                if scenario_kind:
                    assert line.endswith(f"{summary} [{scenario_kind}]"), line
    for name in PROTOCOLS.names():  # listed, not loaded
        assert ("kind", name) in lines
    assert {"class_incremental", "test_time"} <= set(PROTOCOLS.names())


def test_an_entry_is_imported_only_when_it_is_got(tmp_path, monkeypatch):
    from clbench.registry import Registry

    (tmp_path / "lazy_base_5b1e.py").write_text(
        textwrap.dedent(
            '''
            class Base:
                """A base with a docstring."""

                kind = "test_time"
            '''
        )
    )
    (tmp_path / "lazy_comp_5b1e.py").write_text(
        textwrap.dedent(
            '''
            from lazy_base_5b1e import Base as Parent


            class Comp(Parent):
                """A lazily registered component.

                More text.
                """


            class Undocumented(Parent):
                pass
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("thing", "clbench.no_such_group")
    reg.add("comp", "lazy_comp_5b1e:Comp")
    reg.add("plain", "lazy_comp_5b1e:Undocumented")
    reg.add("broken", "no_such_module_5b1e:Thing", source="broken-dist")

    assert reg.names() == ["broken", "comp", "plain"] and "comp" in reg
    entry = reg.entry("comp")
    assert entry.summary == "A lazily registered component."
    assert entry.scenario_kind == "test_time"  # from the base, in another module
    assert reg.entry("plain").summary == "A base with a docstring."  # inherited, as getdoc
    assert next(e.summary for e in reg) == ""  # a broken plugin ("broken") still lists
    assert not entry.loaded
    assert "lazy_comp_5b1e" not in sys.modules and "lazy_base_5b1e" not in sys.modules

    cls = reg.get("comp")
    assert "lazy_comp_5b1e" in sys.modules and cls is sys.modules["lazy_comp_5b1e"].Comp
    assert entry.loaded and entry.obj is cls and reg.get("comp") is cls

    from clbench.errors import ClbenchError

    with pytest.raises(ClbenchError) as e:
        reg.get("broken")
    msg = str(e.value)
    assert "\n" not in msg and "'broken'" in msg and "broken-dist" in msg
    assert "ModuleNotFoundError" in msg and "no_such_module_5b1e" in msg
    with pytest.raises(ClbenchError, match="unknown thing 'nope'; valid choices: broken"):
        reg.get("nope")
    for name in ("lazy_comp_5b1e", "lazy_base_5b1e"):
        sys.modules.pop(name, None)


def test_register_decorator_still_works():
    from clbench.registry import DuplicateNameError, Registry

    reg = Registry("thing", "clbench.no_such_group")

    @reg.register("mine")
    def mine():
        """Mine."""

    assert reg.get("mine") is mine and reg.entry("mine").summary == "Mine."
    reg.register("mine")(mine)  # the same object again: fine
    with pytest.raises(DuplicateNameError, match="'mine' is registered twice"):
        reg.register("mine")(lambda: None)


def _fake_dist(root: Path, dist: str, entry_points: str) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_broken_and_clashing_plugins(tmp_path):
    site = tmp_path / "site"
    _fake_dist(
        site,
        "broken-plugin",
        "[clbench.strategies]\nbroken = no_such_module_5b1e:Thing\n"
        "lora = no_such_module_5b1e:Lora\n",  # a built-in's name: the built-in wins
    )
    rc, out, err, heavy = _clbench(["list"], tmp_path, site)
    assert rc == 0 and heavy == [], err
    assert any(
        ln.split()[:2] == ["strategy", "broken"] and "(from broken-plugin)" in ln for ln in out
    )
    lora = next(ln for ln in out if ln.split()[:2] == ["strategy", "lora"])
    assert "(from" not in lora

    rc, out, err, heavy = _clbench(["run", "strategy=broken"], tmp_path, site)
    assert rc == 2 and heavy == [], err
    assert len(err) == 1, err
    assert err[0].startswith("error: cannot load strategy plugin 'broken' from broken-plugin")
    assert "ModuleNotFoundError" in err[0] and "no_such_module_5b1e" in err[0]

    _fake_dist(site, "other-plugin", "[clbench.strategies]\nbroken = other_module_5b1e:Thing\n")
    rc, out, err, heavy = _clbench(["list"], tmp_path, site)
    assert rc == 2 and heavy == [], err
    assert len(err) == 1 and "strategy 'broken' is registered twice" in err[0], err


def test_a_deferred_module_runs_at_its_first_use(tmp_path, monkeypatch):
    from clbench.deferred import defer, is_loaded

    name = "deferred_5b1e"
    ran = tmp_path / "ran"
    (tmp_path / f"{name}.py").write_text(f"open({str(ran)!r}, 'w').close()\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    defer([name])
    try:
        module = __import__(name)
        assert not ran.exists() and not is_loaded(name)
        assert module.VALUE == 42 and ran.exists() and is_loaded(name)
    finally:
        sys.modules.pop(name, None)
