"""The base of every supervised clbench strategy: an Avalanche ``SupervisedTemplate``.

A subclass sets ``Config`` (a dataclass: the schema of conf/strategy/NAME.yaml) and
overrides :meth:`prepare_model` (freeze / inject adapters once) and, where the method
needs it, the Avalanche hooks (``_before_training_exp``, ``_after_training_exp``,
``criterion``...). Avalanche plugins (replay, schedulers, EvaluationPlugin) compose
with it; an Avalanche user can use it without clbench's CLI. What every strategy shares
with the test-time ones (parameter counts, the optimizer factory, ``uses_task_id``) is
:class:`~clbench.strategies.learner.Learner`'s.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from clbench.strategies.learner import OPTIMIZERS, Learner
from torch import nn

from clbench.adapters.state import decode_refs, encode_refs, restore_structure, structure_of
from clbench.checks import check_choice, check_positive, check_range
from clbench.data import TensorBatches, materialise
from clbench.models import ClassifierModel
from clbench.precision import to_float32
from clbench.seeding import derived_generator

LOSS_MASKS = ("seen", "current")
LR_SCHEDULES = ("constant", "cosine", "quarter_cosine", "warmup_cosine")


@dataclass
class StrategyConfig:
    """Training options shared by supervised strategies (schema of conf/strategy/*.yaml)."""

    name: str = "???"
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    # Which logits the training cross-entropy sees: "seen" = every class learned so
    # far (plain fine-tuning), "current" = only the current experience's classes
    # (InfLoRA / SD-LoRA / L2P's class mask).
    loss_mask: str = "seen"
    # Restarting at every experience: "cosine": epoch e of E trains at
    # lr * (1 + cos(pi e / E)) / 2; "quarter_cosine": epoch e at lr * cos(99 pi e / (200 (E-1)))
    # (the CosineSchedule of CODA-Prompt's and InfLoRA's code); "warmup_cosine": per step s of
    # S, lr (s + 1) / W for the first W = warmup_steps() steps, then
    # lr * (1 + cos(pi (s - W) / (S - W))) / 2 (the cosine_lr of MoE-Adapters' code)
    lr_schedule: str = "constant"
    # label smoothing of the training cross-entropy, over the classes the loss mask keeps
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_positive("strategy.epochs", self.epochs)
        check_positive("strategy.batch_size", self.batch_size)
        check_positive("strategy.eval_batch_size", self.eval_batch_size)
        check_positive("strategy.lr", self.lr)
        check_positive("strategy.weight_decay", self.weight_decay, allow_zero=True)
        check_choice("strategy.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("strategy.loss_mask", self.loss_mask, LOSS_MASKS)
        check_choice("strategy.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("strategy.label_smoothing", self.label_smoothing, 0.0, 1.0)


class CLStrategy(Learner, SupervisedTemplate):
    """A continual learner on a :class:`ClassifierModel` with a growing head."""

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    kind: ClassVar[str] = "class_incremental"

    def __init__(
        self,
        *,
        model: ClassifierModel,
        cfg: StrategyConfig,
        seed: int = 0,
        device: str | torch.device = "cpu",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator: EvaluationPlugin | None = None,
        in_memory: bool = True,
        n_experiences: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.n_experiences = n_experiences  # length of the stream, for methods that schedule on it
        self.seed = seed
        self.in_memory = in_memory
        self.prepare_model(model)
        placeholder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        super().__init__(
            model=model,
            optimizer=placeholder,
            train_mb_size=cfg.batch_size,
            train_epochs=cfg.epochs,
            eval_mb_size=cfg.eval_batch_size,
            device=device,
            plugins=list(plugins or []),
            evaluator=evaluator if evaluator is not None else silent_evaluator(),
        )
        self.seen_classes: list[int] = []
        self.current_classes: list[int] = []
        self._epoch_counter = 0

    # ----------------------------------------------------------------- hooks
    def prepare_model(self, model: ClassifierModel) -> None:
        """Called once before training: freeze parts, inject adapters. Default: train all."""

    def adapt_to_experience(self) -> None:
        """Called at the start of each training experience, after the head has grown."""

    # ------------------------------------------------------------ avalanche
    def check_model_and_optimizer(self, **kwargs: Any) -> None:
        self.model = self.model_adaptation()
        self.adapt_to_experience()
        self.make_optimizer()

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        model = self.model if model is None else model
        if self.is_training:
            classes = sorted(int(c) for c in self.experience.classes_in_this_experience)
            self.current_classes = classes
            self.seen_classes = sorted(set(self.seen_classes) | set(classes))
            model.head.grow(max(self.seen_classes) + 1)
        return model.to(self.device)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Avalanche's hook: a fresh optimizer over the trainable parameters (Learner's)."""
        self.optimizer = self.build_optimizer()

    def warmup_steps(self) -> int:
        """Linear warm-up steps of the ``warmup_cosine`` schedule (default: none)."""
        return 0

    def _set_lr(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor

    def _before_training_epoch(self, **kwargs: Any) -> None:
        e, n = self.clock.train_exp_epochs, max(self.train_epochs, 1)
        if self.cfg.lr_schedule == "cosine":
            self._set_lr((1.0 + math.cos(math.pi * e / n)) / 2.0)
        elif self.cfg.lr_schedule == "quarter_cosine":
            self._set_lr(math.cos(99 * math.pi * e / (200 * (n - 1))) if n > 1 else 1.0)
        super()._before_training_epoch(**kwargs)

    def _before_training_iteration(self, **kwargs: Any) -> None:
        if self.cfg.lr_schedule == "warmup_cosine":
            s, w = self.clock.train_exp_iterations, self.warmup_steps()
            total = self.train_epochs * len(self.dataloader)
            if s < w:
                self._set_lr((s + 1) / w)
            else:
                self._set_lr((1.0 + math.cos(math.pi * (s - w) / max(total - w, 1))) / 2.0)
        super()._before_training_iteration(**kwargs)

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        exp_id = int(self.experience.current_experience)
        generator = derived_generator(self.seed, exp_id)
        if not self.in_memory:
            # images read from files: DataLoader workers (the experience's loader_workers);
            # the order and each sample's random transforms drawn from the generator
            from clbench.data import LazyBatches

            self.dataloader = LazyBatches(
                self.adapted_dataset,
                self.train_mb_size,
                shuffle=shuffle,
                generator=generator,
                num_workers=int(getattr(self.experience, "loader_workers", 0)),
                pin_memory=torch.device(self.device).type == "cuda",
            )
            return
        self.dataloader = TensorBatches(
            materialise(self.adapted_dataset),
            self.train_mb_size,
            shuffle=shuffle,
            generator=generator,
        )

    def make_eval_dataloader(self, **kwargs: Any) -> None:
        if not self.in_memory:
            from clbench.data import LazyBatches

            self.dataloader = LazyBatches(
                self.adapted_dataset,
                self.eval_mb_size,
                shuffle=False,
                num_workers=int(getattr(self.experience, "loader_workers", 0)),
                pin_memory=torch.device(self.device).type == "cuda",
            )
            return
        self.dataloader = TensorBatches(
            materialise(self.adapted_dataset), self.eval_mb_size, shuffle=False
        )

    def criterion(self) -> torch.Tensor:
        logits, y = self.mb_output, self.mb_y
        if not self.is_training:
            if logits.shape[1] == 0 or int(y.max()) >= logits.shape[1]:
                return torch.tensor(float("nan"))
            return F.cross_entropy(logits, y)
        return training_ce(
            logits, y, self.cfg.loss_mask, self.current_classes, self.cfg.label_smoothing
        )

    # ------------------------------------------------------------ precision
    def training_epoch(self, **kwargs: Any) -> None:
        """Avalanche's training epoch, its forward passes and losses in the run's precision."""
        with self.precision_passes():
            super().training_epoch(**kwargs)

    def eval_epoch(self, **kwargs: Any) -> None:
        """Avalanche's evaluation epoch, its forward passes and losses in the run's precision."""
        with self.precision_passes():
            super().eval_epoch(**kwargs)

    @contextmanager
    def precision_passes(self) -> Iterator[None]:
        """Within the block, the ``forward()`` and ``criterion()`` Avalanche's loops call (the
        most derived ones) run under :meth:`autocast`, their outputs cast to float32 (so
        plugins, buffers and metrics see float32 logits); the hooks between them run outside
        autocast. In fp32, or within an enclosing block (an evaluation during training),
        nothing more changes."""
        if not self.precision.enabled or "forward" in vars(self):
            yield
            return
        forward, criterion = self.forward, self.criterion

        def forward_pass() -> Any:
            with self.autocast():
                return to_float32(forward())

        def loss() -> Any:
            with self.autocast():
                return to_float32(criterion())

        self.forward, self.criterion = forward_pass, loss  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self.forward, self.criterion

    def backward(self) -> None:
        """``loss.backward()``; fp16: of the scaled loss, the gradients then unscaled."""
        self.precision.backward(self.loss, self.optimizer, retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        """``optimizer.step()``; fp16: through the loss scaler."""
        self.precision.step(self.optimizer)

    # ------------------------------------------------------------ checkpoint
    #: the strategy's own attributes (beyond its model) that a checkpoint carries: JSON
    #: values, tensors, the model's modules and parameters (saved by name), other
    #: parameters, and lists / string-keyed dicts of these. A strategy whose state is not
    #: of that form overrides :meth:`extra_state` / :meth:`load_extra_state` instead.
    STATE: ClassVar[tuple[str, ...]] = ()

    def extra_state(self) -> dict[str, Any]:
        """The method state beyond the model's tensors and shape (default: ``STATE``)."""
        return {name: getattr(self, name) for name in self.STATE}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (default: set the attributes)."""
        for name, value in state.items():
            setattr(self, name, value)

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue after the current experience, as data: the
        model's shape and tensors, which parameters train, the classes seen, Avalanche's
        clock and :meth:`extra_state` (see :mod:`clbench.statefile`)."""
        model = self.model
        return {
            "structure": structure_of(model),
            "model": dict(model.state_dict()),
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
            "seen_classes": list(self.seen_classes),
            "current_classes": list(self.current_classes),
            "epoch_counter": self._epoch_counter,
            "clock": dict(vars(self.clock)),
            "extra": encode_refs(self.extra_state(), model),
        }

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Put this strategy, freshly built from the run's config, in the state
        :meth:`checkpoint_state` saved."""
        model = self.model
        restore_structure(model, state["structure"])
        model.to(self.device)
        model.load_state_dict(state["model"], strict=True)
        trainable = set(state["trainable"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        self.seen_classes = [int(c) for c in state["seen_classes"]]
        self.current_classes = [int(c) for c in state["current_classes"]]
        self._epoch_counter = int(state["epoch_counter"])
        for key, value in state["clock"].items():
            setattr(self.clock, key, value)
        self.load_extra_state(decode_refs(state["extra"], model))


def silent_evaluator() -> EvaluationPlugin:
    """An EvaluationPlugin with no metrics and no loggers (clbench records its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def training_ce(
    logits: torch.Tensor,
    y: torch.Tensor,
    loss_mask: str,
    current_classes: Sequence[int],
    smoothing: float = 0.0,
) -> torch.Tensor:
    """The training cross-entropy: over every output (``loss_mask`` "seen") or over the
    current classes only ("current"; label smoothing then spreads over those classes)."""
    if loss_mask != "current":
        return F.cross_entropy(logits, y, label_smoothing=smoothing)
    if smoothing > 0:  # smoothing must not spread mass to masked (-inf) classes
        keep = torch.tensor(list(current_classes), device=logits.device)
        position = torch.full((logits.shape[1],), -1, device=logits.device)
        position[keep] = torch.arange(len(keep), device=logits.device)
        return F.cross_entropy(logits[:, keep], position[y], label_smoothing=smoothing)
    return F.cross_entropy(mask_logits(logits, current_classes), y)


def mask_logits(logits: torch.Tensor, keep: Sequence[int]) -> torch.Tensor:
    """Logits with every column outside ``keep`` set to -inf."""
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    mask[list(keep)] = 0.0
    return logits + mask
