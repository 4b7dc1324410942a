"""Dynamic rank selection (SoRA / CoDyRA): gated LoRA ranks pruned by a proximal step.

Every LoRA rank has a gate: y = W x + B diag(g) A x. After each optimiser step the gate
goes through the proximal operator of an L1 penalty, g <- sign(g) max(|g| - k, 0), so
ranks die exactly. CoDyRA's schedule: a dense phase (k = 0) for the first half of the
task's iterations, then k ramped linearly to ``kappa`` over ``ramp_steps`` steps; between
tasks the zero ranks are dropped, B diag(g) A is merged into W and a fresh LoRA starts,
so inference costs what the bare backbone costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from clbench.strategies.lora import LoRAConfig, LoRAStrategy

from clbench.adapters.lora import add_blocks, prune_zero_ranks
from clbench.checks import check_choice, check_positive, check_range


def soft_threshold_(gate: torch.Tensor, k: float) -> None:
    """In place: the proximal operator of k * ||g||_1."""
    gate.copy_(torch.sign(gate) * torch.clamp(gate.abs() - k, min=0.0))


@dataclass
class DyRankConfig(LoRAConfig):
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    optimizer: str = "adamw"
    adam_beta2: float = 0.9999
    # final threshold k (CoDyRA max_kappa 5e-3; SoRA uses a fixed 1e-3 from step 0)
    kappa: float = 5e-3
    dense_fraction: float = 0.5  # first half of a task's iterations: no thresholding
    ramp_steps: int = 50  # k goes 0 -> kappa linearly over these steps (0: at once)
    gate_init: str = "randn"  # SoRA initialises gates with randn; "ones" is plain LoRA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.kappa", self.kappa, allow_zero=True)
        check_range("strategy.dense_fraction", self.dense_fraction, 0.0, 1.0)
        check_positive("strategy.ramp_steps", self.ramp_steps, allow_zero=True)
        check_choice("strategy.gate_init", self.gate_init, ("randn", "ones"))
        check_range("strategy.adam_beta2", self.adam_beta2, 0.0, 1.0)


class DyRank(LoRAStrategy):
    """Dynamic rank-selective LoRA: gates soft-thresholded to zero, merged between tasks."""

    Config = DyRankConfig
    cfg: DyRankConfig
    block_kwargs: ClassVar[dict[str, object]] = {"gated": True}
    STATE = (*LoRAStrategy.STATE, "ranks_kept", "_step", "_total_steps")

    def prepare_model(self, model: Any) -> None:
        super().prepare_model(model)
        self._init_gates()
        self.ranks_kept: list[int] = []  # per finished task: total ranks merged
        self._step = 0
        self._total_steps = 1

    def _init_gates(self) -> None:
        if self.cfg.gate_init == "randn":
            with torch.no_grad():
                for b in self.new_blocks:
                    b.gate.normal_()

    def adam_betas(self) -> tuple[float, float]:
        return (0.9, self.cfg.adam_beta2)

    def start_new_task(self) -> None:
        self.new_blocks = self._add_blocks(self.model)
        self._init_gates()

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        self._step = 0
        self._total_steps = max(1, self.train_epochs * len(self.dataloader))

    def threshold(self, step: int) -> float:
        """k at optimiser step ``step`` of the current task (CoDyRA schedule)."""
        dense = int(self.cfg.dense_fraction * self._total_steps)
        if step < dense:
            return 0.0
        if self.cfg.ramp_steps == 0:
            return self.cfg.kappa
        return self.cfg.kappa * min(1.0, (step - dense + 1) / self.cfg.ramp_steps)

    def optimizer_step(self) -> None:
        super().optimizer_step()
        k = self.threshold(self._step)
        self._step += 1
        if k > 0:
            with torch.no_grad():
                for b in self.new_blocks:
                    soft_threshold_(b.gate, k)

    def _after_training_exp(self, **kwargs: Any) -> None:
        kept = 0
        for layer in self.lora_layers().values():
            for b in layer.blocks:
                prune_zero_ranks(b)
                kept += b.rank
            layer.merge_and_clear()
        self.ranks_kept.append(kept)
        self.new_blocks = []
        super()._after_training_exp(**kwargs)


@dataclass
class IncRankConfig(LoRAConfig):
    rank: int = 8  # r1: rank learnt on the first task
    alpha: float = 8.0  # scale 1
    new_rank: int = 1  # components appended per later task (ITL: rank-1)
    # norm of a new component's u (its v has unit norm). ITL initialises new factors
    # orthogonally to the old ones; their scale is not given: ours keeps the start close to W.
    init_scale: float = 0.01
    loss_mask: str = "current"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.new_rank", self.new_rank)
        check_positive("strategy.init_scale", self.init_scale, allow_zero=True)


def _orthogonal_rows(n: int, dim: int, against: torch.Tensor | None) -> torch.Tensor:
    """``n`` orthonormal rows of length ``dim``, orthogonal to the rows of ``against``
    (drawn from the global CPU generator and computed on the CPU, whatever the device)."""
    x = torch.randn(dim, n)
    if against is not None and against.numel():
        q, _ = torch.linalg.qr(against.T.cpu())  # basis of the old rows
        x = x - q @ (q.T @ x)
    q, _ = torch.linalg.qr(x)
    return q.T[:n]


class IncRank(LoRAStrategy):
    """Incremental rank (ITL): frozen U, V grow per task; the task id picks a selector s_t."""

    uses_task_id = True

    Config = IncRankConfig
    cfg: IncRankConfig

    def prepare_model(self, model: Any) -> None:
        super().prepare_model(model)
        # selectors[t][id(block)]: the gate vector s_t restricted to that block
        self.selectors: list[dict[int, torch.nn.Parameter]] = []

    def extra_state(self) -> dict[str, Any]:
        """Adds every task's selector, keyed by its block's name in the model."""
        names = {id(m): n for n, m in self.model.named_modules()}
        selectors = [{names[i]: p for i, p in s.items()} for s in self.selectors]
        return {**super().extra_state(), "selectors": selectors}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        modules = dict(self.model.named_modules())
        self.selectors = [{id(modules[n]): p for n, p in s.items()} for s in state.pop("selectors")]
        super().load_extra_state(state)
        if self.selectors:
            self._use_selector(len(self.selectors) - 1)

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        t = self.tasks_seen - 1
        selector: dict[int, torch.nn.Parameter] = {}
        new_ids = {id(b) for b in self.new_blocks}
        for layer in self.lora_layers().values():
            for b in layer.blocks:
                start = 1.0 if id(b) in new_ids else 0.0
                selector[id(b)] = torch.nn.Parameter(torch.full((b.rank,), start).to(b.A))
        self.selectors.append(selector)
        self._use_selector(t)

    def start_new_task(self) -> None:
        self.freeze_and_add_blocks()
        blocks = self.new_blocks
        layers = list(self.lora_layers().values())
        with torch.no_grad():
            for layer in layers:
                for b in (b for b in layer.blocks if any(b is n for n in blocks)):
                    old = [o for o in layer.blocks if o is not b and o.out_slice == b.out_slice]
                    old_a = torch.cat([o.A for o in old]) if old else None
                    old_b = torch.cat([o.B.T for o in old]) if old else None
                    b.A.copy_(_orthogonal_rows(b.rank, b.A.shape[1], old_a))
                    b.B.copy_(_orthogonal_rows(b.rank, b.B.shape[0], old_b).T * self.cfg.init_scale)

    def _add_blocks(self, model: Any) -> list[Any]:
        rank = self.cfg.rank if self.tasks_seen == 0 else self.cfg.new_rank
        root, tower = self.lora_root(model)
        return add_blocks(
            root,
            self.cfg.targets,
            rank,
            float(rank) * self.cfg.alpha / self.cfg.rank,
            dropout=self.cfg.dropout,
            tower=tower,
            gated=True,
        )

    def _use_selector(self, task: int) -> None:
        """Point every block's gate at s_task (zeros for blocks added after that task)."""
        selector = self.selectors[task]
        for layer in self.lora_layers().values():
            for b in layer.blocks:
                if id(b) not in selector:
                    selector[id(b)] = torch.nn.Parameter(
                        torch.zeros(b.rank).to(b.A), requires_grad=False
                    )
                b.gate = selector[id(b)]

    def _before_eval_exp(self, **kwargs: Any) -> None:
        # task-incremental: the test experience's id selects s_t (the latest for unseen tasks)
        if self.selectors:
            self._use_selector(
                min(int(self.experience.current_experience), len(self.selectors) - 1)
            )
        super()._before_eval_exp(**kwargs)

    def _after_eval(self, **kwargs: Any) -> None:
        if self.selectors:
            self._use_selector(len(self.selectors) - 1)
        super()._after_eval(**kwargs)

    def num_inference_parameters(self) -> int:
        """Backbone + head + every task's selector (U, V are merged per task at inference)."""
        sel = sum(p.numel() for s in self.selectors for p in s.values())
        return super().num_inference_parameters() + sel
