"""A scenario kind is a protocol: one registered class that owns everything that differs
between kinds.

A protocol (registered under its kind in :data:`clbench.registry.PROTOCOLS`; third
parties use the entry-point group ``clbench.protocols``) declares the learner contract it
accepts (a strategy base class), builds and runs the learner, turns the result into its
part of the run record (metrics, per-step values, cost, its own fields), draws its plots,
prints its console summary, says whether and how it checkpoints, and carries the
:class:`BoardSpec` the leaderboard ranks and draws its boards with. The runner
(:mod:`clbench.runner`) reads straight through and never tests a kind's name::

    validate -> scenario, backbone -> protocol = PROTOCOLS[scenario.kind]
    -> protocol.check_strategy -> build / resume -> run -> record -> run dir, tracking

See docs/extending.md ("Adding a scenario kind").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from clbench.errors import ClbenchError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from clbench.backbones.base import Backbone
    from clbench.record import RunRecord
    from clbench.scenarios.base import Scenario

#: how a board cell shows a value: a count (1,234), seconds shown as ms, a rate (123),
#: a plain number with two decimals
FORMATS: dict[str, Callable[[float], str]] = {
    "count": lambda v: f"{int(v):,}",
    "ms": lambda v: f"{v * 1000:.1f} ms",
    "rate": lambda v: f"{v:.0f}",
    "number": lambda v: f"{v:.2f}",
}


@dataclass(frozen=True)
class Column:
    """One value of a run record shown on a board or in a summary table.

    ``key`` names an entry of the record's ``metrics`` (``source="metrics"``) or
    ``efficiency`` (``source="efficiency"``); costs aggregate over seeds by ``aggregate``
    (``mean`` or ``max``) and are shown with ``format`` (a key of :data:`FORMATS`).
    """

    key: str
    label: str
    source: str = "metrics"
    aggregate: str = "mean"
    format: str = "number"

    def show(self, value: float | None) -> str:
        """The cell text of a cost value (``n/a`` when missing)."""
        if value is None or not math.isfinite(value):
            return "n/a"
        return FORMATS[self.format](value)


#: cost columns every kind's board shows alike
TRAINABLE_PARAMS = Column("trainable_params", "trainable params", "efficiency", "max", "count")
INFERENCE_PARAMS = Column("inference_params", "inference params", "efficiency", "max", "count")
TRAIN_SECONDS = Column("train_seconds", "train s", "efficiency", "mean", "number")


@dataclass(frozen=True)
class BoardSpec:
    """How a kind's boards rank and draw: the leaderboard knows nothing else of a kind.

    ``primary`` ranks the entries (``higher_is_better``); ``secondary`` metrics and
    ``costs`` (efficiency values) are the other columns. The curve is the per-step value
    ``curve`` of the record's ``steps``, drawn with the title ``curve_title``, the x axis
    ``curve_x`` (what one step is: an experience, a domain) and the y axis ``curve_y``.
    ``details`` are the further columns of ``benchmarks/summarize_runs.py``.
    """

    primary: Column
    higher_is_better: bool
    curve: str
    curve_title: str
    curve_x: str
    curve_y: str
    secondary: tuple[Column, ...] = ()
    costs: tuple[Column, ...] = ()
    details: tuple[Column, ...] = ()


@dataclass
class RunContext:
    """Everything a protocol needs to build and run one job."""

    cfg: DictConfig  # the composed run config (validated)
    typed: dict[str, Any]  # group -> the component's Config instance
    scenario: Scenario
    backbone: Backbone
    strategy_cls: type
    run_dir: Path
    device: torch.device
    seed: int
    progress: bool = True
    checkpoint: bool = True  # whether a resumable protocol checkpoints after each step
    sweep_id: str | None = None


@dataclass
class RecordPart:
    """A protocol's part of the run record."""

    metrics: dict[str, float | None]
    steps: list[dict[str, float | None]]  # one entry per step (experience, domain...)
    efficiency: dict[str, float | int | None]
    fields: dict[str, Any] = field(default_factory=dict)  # the kind's own record fields


class Protocol:
    """Base of every scenario kind's protocol (see the module docstring)."""

    #: the scenario kind this protocol runs (``Scenario.kind``)
    kind: ClassVar[str]
    #: the strategy base class its learners subclass
    learner: ClassVar[type]
    #: how its boards rank and draw
    board: ClassVar[BoardSpec]
    #: whether a killed run continues with ``clbench resume``
    resumable: ClassVar[bool] = False
    #: the kind's own top-level fields of results.json (the leaderboard and
    #: summarize_runs check them when they read a record)
    record_fields: ClassVar[tuple[str, ...]] = ()

    def check_strategy(self, name: str, strategy_cls: type) -> None:
        """One clear line if ``strategy_cls`` is not a learner of this kind: it must subclass
        the kind's learner base and declare this ``kind`` (a learner base of one kind may
        derive from another's: an erasure strategy is a ``CLStrategy`` of kind
        ``forgetting``)."""
        theirs = getattr(strategy_cls, "kind", None)
        subclass = isinstance(strategy_cls, type) and issubclass(strategy_cls, self.learner)
        if not subclass or theirs not in (None, self.kind):
            runs = f"it runs {theirs!r} scenarios" if theirs else "it is no learner of this kind"
            raise ClbenchError(
                f"strategy {name!r} does not support {self.kind!r} scenarios ({runs}); "
                f"a {self.kind} strategy subclasses {self.learner.__module__}."
                f"{self.learner.__qualname__}"
            )

    def build(self, ctx: RunContext) -> Any:
        """The learner for this job (the strategy on the backbone's classifier)."""
        raise NotImplementedError

    def run(self, ctx: RunContext, learner: Any, resumed: Any = None) -> Any:
        """Run the learner through the scenario; ``resumed`` is what :meth:`resume` gave."""
        raise NotImplementedError

    def resume(self, ctx: RunContext) -> tuple[Any, Any]:
        """The learner and the partial result of ``ctx.run_dir``'s checkpoint."""
        raise ClbenchError(
            f"nothing to resume in {ctx.run_dir}: {self.kind} runs are not checkpointed; "
            "start it again"
        )

    def record(self, ctx: RunContext, learner: Any, result: Any) -> RecordPart:
        """The protocol's part of the run record."""
        raise NotImplementedError

    def plots(self, record: RunRecord, run_dir: Path) -> list[Path]:
        """Draw the run's plots into ``run_dir``; returns the files written."""
        return []

    def summary(self, record: RunRecord) -> str:
        """The console summary printed at the end of a run."""
        return "\n".join(metric_lines(record.metrics))

    def finished(self, run_dir: Path) -> None:
        """Called once the run record is written: drop what only a resume needed."""


def metric_lines(metrics: dict[str, Any], keys: Any = None) -> list[str]:
    """``name: value`` lines of ``metrics`` (``keys``: which, in order; default all)."""
    out = []
    for k in keys if keys is not None else metrics:
        v = metrics.get(k)
        ok = isinstance(v, float) and math.isfinite(v)
        out.append(f"{k:>30}: {v:.4f}" if ok else f"{k:>30}: n/a")
    return out


def protocol_for(kind: str, scenario: str = "") -> Protocol:
    """The protocol of scenario kind ``kind``; one clear line if none is installed."""
    from clbench.registry import PROTOCOLS

    if kind not in PROTOCOLS:
        where = f"scenario {scenario!r} has" if scenario else "the run has"
        raise ClbenchError(
            f"{where} kind {kind!r} and no installed protocol runs it; installed kinds: "
            f"{', '.join(PROTOCOLS.names())} (a kind's package registers it under the "
            "entry-point group clbench.protocols)"
        )
    return PROTOCOLS.get(kind)()
