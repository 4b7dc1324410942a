"""InfLoRA (Liang and Li, CVPR 2024): interference-free low-rank adaptation.

Per task a LoRA branch on k and v of every block. Before training task t its down-
projection A_t is *designed*, not learnt: the covariance of the layer's input on the
task's data, projected away from (or into) the DualGPM subspace of earlier tasks, gives
A_t = (top-r left singular vectors)^T / sqrt(3), frozen. Only B_t (init 0) and the head
train. After the task the DualGPM basis grows with the trained model's input subspace.

On a CLIP backbone InfLoRA goes into the image tower only (``tower=image``): A_t is
designed from the task's images, and the text tower never sees them (it encodes the
class-name prompts), so ``tower=text`` / ``both`` are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from clbench.strategies.lora import LoRAConfig, LoRAStrategy

from clbench.adapters.lora import LoRALinear, inject_lora
from clbench.checks import check_range
from clbench.errors import ClbenchError, ConfigError
from clbench.models import ClipClassifier


@dataclass
class InfLoRAConfig(LoRAConfig):
    rank: int = 10
    alpha: float = 10.0  # scale 1
    targets: list[str] = field(default_factory=lambda: ["k", "v"])
    # the official code's per-task CosineSchedule (Adam): lr * cos(99 pi e / (200 (E - 1)))
    lr_schedule: str = "quarter_cosine"
    # DualGPM energy threshold lb + (1 - lb) * t / T: 0.95 on CIFAR-100, 0.98 on ImageNet-R
    lambda_base: float = 0.95
    # InfLoRA trains with the network in eval mode (no dropout / drop-path)
    train_in_eval_mode: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("strategy.lambda_base", self.lambda_base, 0.0, 1.0)


class DualGPM:
    """Per-layer subspace memory of GPM / InfLoRA.

    ``mode[name] == "remove"``: ``basis[name]`` spans the input subspace used by past
    tasks (new directions are designed orthogonal to it). Once that basis exceeds half
    the dimension the layer switches to ``"retain"`` and stores the complement: the
    directions still free.
    """

    def __init__(self) -> None:
        self.basis: dict[str, torch.Tensor] = {}
        self.mode: dict[str, str] = {}

    def state(self) -> dict[str, Any]:
        """The bases and modes as data, for a checkpoint."""
        return {"basis": dict(self.basis), "mode": dict(self.mode)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.basis, self.mode = dict(state["basis"]), dict(state["mode"])

    def project(self, name: str, cov: torch.Tensor) -> torch.Tensor:
        """Covariance restricted to what earlier tasks left free."""
        if name not in self.basis:
            return cov
        u = self.basis[name]
        return cov - u @ (u.T @ cov) if self.mode[name] == "remove" else u @ (u.T @ cov)

    def update(self, name: str, cov: torch.Tensor, threshold: float) -> None:
        u_all, s_all, _ = torch.linalg.svd(cov)
        total = float((s_all**2).sum())
        if name not in self.basis:
            ratio = torch.cumsum(s_all**2, 0) / total
            r = max(int((ratio < threshold).sum()), 1)
            self.basis[name] = u_all[:, :r]
            self.mode[name] = "remove" if r < cov.shape[0] / 2 else "retain"
            if self.mode[name] == "retain":
                self.basis[name] = u_all[:, r:]
        elif self.mode[name] == "remove":
            u = self.basis[name]
            hat = cov - u @ (u.T @ cov)
            uh, sh, _ = torch.linalg.svd(hat)
            captured = (total - float((sh**2).sum())) / total
            r = 0
            for v in (sh**2 / total).tolist():
                if captured >= threshold:
                    break
                captured += v
                r += 1
            if r:
                self.basis[name] = torch.cat([u, uh[:, :r]], 1)[:, : cov.shape[0]]
        else:  # retain: basis holds the free directions; shrink it by what this task used
            u = self.basis[name]
            hat = u @ (u.T @ cov)
            uh, sh, _ = torch.linalg.svd(hat)
            kept = float((sh**2).sum()) / total
            r = 0
            for v in (sh**2 / total).tolist():
                if kept < 1.0 - threshold:
                    break
                kept -= v
                r += 1
            if r:
                free = u - uh[:, :r] @ (uh[:, :r].T @ u)
                uf, _, _ = torch.linalg.svd(free)
                self.basis[name] = uf[:, : u.shape[1] - r]
        if self.mode[name] == "remove" and self.basis[name].shape[1] > cov.shape[0] / 2:
            uf, _, _ = torch.linalg.svd(self.basis[name])
            self.basis[name] = uf[:, self.basis[name].shape[1] :]
            self.mode[name] = "retain"

    def used_dims(self, name: str, dim: int) -> int:
        """How many input directions past tasks occupy in this layer."""
        k = self.basis[name].shape[1]
        return k if self.mode[name] == "remove" else dim - k


class InfLoRA(LoRAStrategy):
    """InfLoRA: per-task k/v branches with designed, frozen A_t in the DualGPM-free subspace."""

    Config = InfLoRAConfig
    cfg: InfLoRAConfig

    def prepare_model(self, model: Any) -> None:
        self.check_tower(model)
        if isinstance(model, ClipClassifier) and self.cfg.tower != "image":
            raise ConfigError(
                f"inflora supports strategy.tower=image only on CLIP, not {self.cfg.tower!r}: "
                "its A_t comes from the task's images, which the text tower never sees"
            )
        model.backbone.requires_grad_(False)
        root, tower = self.lora_root(model)
        inject_lora(root, self.cfg.targets, tower)  # wrappers with no block yet: same outputs
        self.new_blocks = []
        self.tasks_seen = 0
        self.gpm = DualGPM()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "gpm": self.gpm.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.gpm.load_state(state.pop("gpm"))
        super().load_extra_state(state)

    def adapt_to_experience(self) -> None:
        if self.n_experiences is None:
            raise ClbenchError("inflora needs the stream length (n_experiences) for DualGPM")
        for layer in self.lora_layers().values():
            layer.freeze_blocks()
        covs = self.input_covariances()
        self.new_blocks = self._add_blocks(self.model)
        for name, layer in self.lora_layers().items():
            _, _, design = torch.linalg.svd(self.gpm.project(name, covs[name]).T)
            # left singular vectors of M are the right ones of M^T: rows of `design`
            a = design[: self.cfg.rank] / math.sqrt(3.0)
            for block in layer.blocks:
                if block in self.new_blocks:
                    with torch.no_grad():
                        block.A.copy_(a)
                    block.A.requires_grad_(False)
        if self.cfg.train_in_eval_mode:
            self.model.eval()
        self.tasks_seen += 1

    def _after_training_exp(self, **kwargs: Any) -> None:
        t, total = self.tasks_seen - 1, self.n_experiences or 1
        threshold = self.cfg.lambda_base + (1.0 - self.cfg.lambda_base) * t / total
        for name, cov in self.input_covariances().items():
            self.gpm.update(name, cov, threshold)
        super()._after_training_exp(**kwargs)

    @torch.no_grad()
    def input_covariances(self) -> dict[str, torch.Tensor]:
        """X^T X / n of every LoRA-wrapped layer's input tokens on the current experience."""
        root, tower = self.lora_root(self.model)
        layers: dict[str, LoRALinear] = inject_lora(root, self.cfg.targets, tower)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(name: str):
            def fn(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]

            return fn

        names = {id(m): n for n, m in self.lora_layers().items()}
        handles = [m.register_forward_pre_hook(hook(names[id(m)])) for m in layers.values()]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.dataloader:
                self.model(batch[0].to(self.device))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return {n: (sums[n] / counts[n]).float() for n in sums}
