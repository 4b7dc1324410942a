"""Continual learning with dynamic sparse training (Yildirim et al., CPAL 2024).

Task-incremental (the test experience's id selects the sub-network), after the official
code (github.com/muratonuryildirim/CL-with-DST: ``core.py`` ``Masking`` / ``train``,
``cifar100.py`` main loop, ``utils.py`` ``freeze_used_params`` / ``set_mask``):

- Every task trains a **new** sparse mask over the backbone's Conv2d / Linear weights
  (:mod:`clbench.adapters.sparse`), at ``density`` (0.2), layer densities uniform or ERK;
  biases and norms stay dense.
- Each step: cross-entropy on the task's logits; backward; the weights used by earlier
  tasks (the union of their stored masks) get zero gradient (official ``isolate``); the
  optimiser steps; every weight outside the current mask is zeroed (with SGD's momentum
  there, as the official ``apply_mask``; Adam's moments are kept, which momentum growth
  reads); every ``update_every`` steps the topology changes (prune ``death_rate`` of each
  layer's active weights, regrow as many; the gradient reaching the weights is dense, so
  gradient growth sees inactive positions) at a death rate decaying on a cosine over the
  task's steps (0.5 to 0.005).
- At the task's end the best-training-accuracy epoch's weights and mask are kept, the mask
  stored, and the **dense store** (all tasks' weights in one tensor per layer) filled: where
  the trained weight is zero the previous store's value is kept, so the weights of earlier
  tasks are never changed. The model then holds the dense store.
- Test experience t: the dense store under task t's mask (the latest task's for a task not
  yet trained); all logits are returned (the protocol's task-agnostic argmax is the
  official test; its task-aware accuracy masks the task's classes).

Departures from the official code:

- The classifier head is clbench's growing head and stays dense: the official code masks
  its fixed 100-way fc like the other layers; here each task trains only its own rows
  (``loss_mask: current``, the official ``output[:, offset_a:offset_b]``), so earlier
  rows are untouched.
- ``test_mask``: ``full`` (official, default) stores the whole final mask; ``used`` (our
  option) stores the positions of the final mask whose trained weight is non-zero. A
  position of an earlier task that regrows into the current mask has a frozen gradient,
  so it stays at the zero regrowth gave it while the task trains; the official dense-store
  fill then puts the earlier task's value there, and the task is tested on a network it
  never trained with (split_digits, WRN-16-2: task 1 tests at 49% with ``full`` where its
  trained network tests at 99%). With ``used`` a task is tested on exactly the network it
  trained, and positions it never moved stay free for later tasks. The default is the
  official behaviour; ``used`` is the fix we offer.
- ``dense_params``: ``shared`` (official) lets every task keep training the biases, norm
  parameters and BatchNorm statistics, so an earlier task's accuracy can drift;
  ``per_task`` (ours) stores each task's copy of those and restores it with the task's
  mask at test time, so earlier tasks are fully isolated.
- The official run uses 400 batches between topology updates on CIFAR-100 (about 4 per
  task); ``update_every`` defaults to 20 to keep about 4 updates on the embedded digits.
- The best epoch: training accuracy is the argmax over all the head's outputs during the
  epoch's steps, as the official ``train`` counts it; ``best_epoch_tie: first`` (official,
  default) keeps the earliest epoch of the best accuracy, ``last`` (our option) the latest.
  A small task reaches 100% training accuracy within a few epochs, and the earlier epoch's
  BatchNorm running statistics are far from converged: on the first split_digits task
  (WRN-16-2, 4 batches per epoch) the official rule keeps epoch 3 of 20 and tests at 62%
  where the last 100% epoch tests at 100%.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from clbench.strategies.base import LR_SCHEDULES, CLStrategy, StrategyConfig
from torch import nn

from clbench.adapters.inject import VALID_TARGETS
from clbench.adapters.sparse import (
    GROW_RULES,
    INITS,
    PRUNE_RULES,
    CosineDecay,
    MaskSet,
    layer_densities,
    mask_layers,
)
from clbench.checks import check_choice, check_positive, check_range
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.seeding import derived_generator

#: where the backbone's unmasked parameters and buffers live (see the module docstring)
DENSE_PARAMS = ("shared", "per_task")
#: which positions a task's stored (test) mask keeps (see the module docstring)
TEST_MASKS = ("full", "used")
#: which epoch of equal best training accuracy a task keeps (see the module docstring)
BEST_EPOCH_TIES = ("first", "last")
#: the base schedules plus the official MultiStepLR (x0.1 at int(E/2) and int(3E/4))
DST_LR_SCHEDULES = (*LR_SCHEDULES, "multistep")
#: mixed into the seed of each task's topology generator (apart from the data order's)
_TOPOLOGY_TAG = 0xD57


@dataclass
class DSTConfig(StrategyConfig):
    name: str = "dst"
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss_mask: str = "current"
    lr_schedule: str = "multistep"
    density: float = 0.2
    init: str = "uniform"
    prune: str = "magnitude"
    grow: str = "random"
    death_rate: float = 0.5
    death_rate_end: float = 0.005
    update_every: int = 20
    # None: every Conv2d / Linear of the backbone; or target names (qkv, proj, fc1, fc2...)
    targets: list[str] | None = None
    keep_best_epoch: bool = True
    best_epoch_tie: str = "first"
    dense_params: str = "shared"
    test_mask: str = "full"

    def __post_init__(self) -> None:
        check_choice("strategy.lr_schedule", self.lr_schedule, DST_LR_SCHEDULES)
        schedule = self.lr_schedule
        if schedule == "multistep":  # the base validates its own schedules only
            self.lr_schedule = "constant"
        try:
            super().__post_init__()
        finally:
            self.lr_schedule = schedule
        check_positive("strategy.density", self.density)
        check_range("strategy.density", self.density, 0.0, 1.0)
        check_choice("strategy.init", self.init, INITS)
        check_choice("strategy.prune", self.prune, PRUNE_RULES)
        check_choice("strategy.grow", self.grow, GROW_RULES)
        check_range("strategy.death_rate", self.death_rate, 0.0, 1.0)
        check_range("strategy.death_rate_end", self.death_rate_end, 0.0, 1.0)
        check_positive("strategy.update_every", self.update_every)
        check_choice("strategy.dense_params", self.dense_params, DENSE_PARAMS)
        check_choice("strategy.test_mask", self.test_mask, TEST_MASKS)
        check_choice("strategy.best_epoch_tie", self.best_epoch_tie, BEST_EPOCH_TIES)
        if self.targets is not None:
            if not self.targets:
                raise ConfigError(
                    "invalid value for strategy.targets: []; give null (every Conv2d / Linear "
                    "of the backbone) or target names such as [qkv, proj, fc1, fc2]"
                )
            for t in self.targets:
                check_choice("strategy.targets", t, VALID_TARGETS)


def multistep_factor(epoch: int, epochs: int, gamma: float = 0.1) -> float:
    """The official MultiStepLR: ``gamma`` per milestone int(E/2), int(3E/4) reached."""
    return gamma ** sum(epoch >= m for m in (int(epochs / 2), int(3 * epochs / 4)))


class DST(CLStrategy):
    """One dynamic sparse sub-network per task over shared weights; the task id selects it."""

    uses_task_id = True

    Config = DSTConfig
    cfg: DSTConfig
    STATE = (
        "task_masks",
        "dense_store",
        "fired",
        "task_params",
        "task_densities",
        "task_updates",
    )

    # ---------------------------------------------------------------- setup
    def prepare_model(self, model: ClassifierModel) -> None:
        if not isinstance(model, ClassifierModel):
            raise ConfigError(
                f"strategy dst needs a backbone with a linear head (a CNN or a ViT), not a "
                f"{type(model).__name__}: choose e.g. backbone=wrn_16_2"
            )
        layers = mask_layers(model.backbone, targets=self.cfg.targets)
        if not layers:
            raise ConfigError(
                f"invalid value for strategy.targets: {self.cfg.targets!r}; it matches no "
                "Conv2d / Linear layer of this backbone: use null (every one of them)"
            )
        self.masks = MaskSet(layers, derived_generator(self.seed, _TOPOLOGY_TAG))
        masked = {id(t) for layer in layers.values() for t in (layer.weight, layer.mask)}
        #: backbone state entries outside the masks: biases, norms, BatchNorm statistics
        self._dense_keys = [
            k for k, v in model.backbone.state_dict(keep_vars=True).items() if id(v) not in masked
        ]
        self.task_masks: list[dict[str, torch.Tensor]] = []  # per task, bool per layer
        self.dense_store: dict[str, torch.Tensor] = {}  # every task's weights, per layer
        self.fired: dict[str, torch.Tensor] = {}  # the last task's ever-active positions
        self.task_params: list[dict[str, torch.Tensor]] = []  # dense_params=per_task
        self.task_densities: list[float] = []  # overall density of each task's mask
        self.task_updates: list[int] = []  # topology updates made in each task
        self._in_task = False
        self._frozen: dict[str, torch.Tensor] = {}
        self._decay = CosineDecay(self.cfg.death_rate, 1, end=self.cfg.death_rate_end)
        self._step = self._updates = 0
        self._best: dict[str, torch.Tensor] | None = None
        self._best_acc = -1.0
        self._correct = self._seen = 0

    def adapt_to_experience(self) -> None:
        """A new task: the dense store's weights, a fresh mask, the earlier masks frozen."""
        cfg = self.cfg
        t = len(self.task_masks)
        self._in_task = True
        if t > 0:
            self._load_weights(self.dense_store)
            self._frozen = {
                n: functools.reduce(torch.logical_or, [m[n] for m in self.task_masks])
                for n in self.masks.layers
            }
        else:
            self._frozen = {}
        self.masks.generator = derived_generator(self.seed, _TOPOLOGY_TAG, t)
        self.masks.randomize(layer_densities(self.masks.shapes(), cfg.density, cfg.init))
        self.masks.apply()
        steps = max(1, self.train_epochs * len(self.dataloader))
        self._decay = CosineDecay(cfg.death_rate, steps, end=cfg.death_rate_end)
        self._step = self._updates = 0
        self._best, self._best_acc = None, -1.0

    # ------------------------------------------------------------- training
    def _before_training_epoch(self, **kwargs: Any) -> None:
        if self.cfg.lr_schedule == "multistep":
            self._set_lr(multistep_factor(self.clock.train_exp_epochs, self.train_epochs))
        self._correct = self._seen = 0
        super()._before_training_epoch(**kwargs)

    def optimizer_step(self) -> None:
        """Freeze earlier tasks' weights, step, zero outside the mask, maybe rewire."""
        cfg = self.cfg
        if self._frozen:
            self.masks.freeze_gradients(self._frozen)
        held = self._hold_frozen() if cfg.weight_decay > 0 else None
        super().optimizer_step()
        if held is not None:
            self._restore_frozen(held)
        self._zero_outside_masks()
        rate = self._decay.step()
        self._step += 1
        if self._step % cfg.update_every == 0:  # MaskSet.update, with the state kept as above
            removed = self.masks.prune(rate, cfg.prune)
            counts = {n: int(r.count_nonzero()) for n, r in removed.items()}
            self.masks.grow(counts, cfg.grow, self.optimizer)
            self._zero_outside_masks()
            self._updates += 1

    def _after_training_iteration(self, **kwargs: Any) -> None:
        with torch.no_grad():
            self._correct += int((self.mb_output.argmax(1) == self.mb_y).sum())
            self._seen += int(self.mb_y.numel())
        super()._after_training_iteration(**kwargs)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        acc = self._correct / max(self._seen, 1)
        # the official checkpoint (best training accuracy); official ties: the first epoch
        later = self.cfg.best_epoch_tie == "last"
        if self.cfg.keep_best_epoch and (acc > self._best_acc or (later and acc == self._best_acc)):
            self._best_acc = acc
            self._best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        super()._after_training_epoch(**kwargs)

    def _after_training_exp(self, **kwargs: Any) -> None:
        """Keep the best epoch, store its mask, fill the dense store and load it."""
        if self._best is not None:
            self.model.load_state_dict(self._best)
        if self.cfg.test_mask == "used":  # drop the positions the task computed with as 0
            self.masks.set(
                {n: lay.mask & (lay.weight != 0) for n, lay in self.masks.layers.items()}
            )
        self.task_masks.append(self.masks.get())
        trained = {n: layer.weight.detach().clone() for n, layer in self.masks.layers.items()}
        if self.dense_store:  # official: param[param == 0] = old_param[param == 0]
            trained = {n: torch.where(w == 0, self.dense_store[n], w) for n, w in trained.items()}
        self.dense_store = trained
        self._load_weights(self.dense_store)
        if self.cfg.dense_params == "per_task":
            self.task_params.append(self._dense_state())
        self.fired = {n: f.clone() for n, f in self.masks.fired.items()}
        self.task_densities.append(float(self.masks.report()["overall"]))
        self.task_updates.append(self._updates)
        self._best, self._frozen, self._in_task = None, {}, False
        super()._after_training_exp(**kwargs)

    # ----------------------------------------------------------- evaluation
    def _before_eval_exp(self, **kwargs: Any) -> None:
        # task-incremental: the test experience's id picks the mask (the latest if unseen)
        if self.task_masks and not self._in_task:
            t = min(int(self.experience.current_experience), len(self.task_masks) - 1)
            self.use_task(t)
        super()._before_eval_exp(**kwargs)

    def _after_eval(self, **kwargs: Any) -> None:
        if self.task_masks and not self._in_task:
            self.use_task(len(self.task_masks) - 1)
        super()._after_eval(**kwargs)

    def use_task(self, t: int) -> None:
        """Put task ``t``'s mask (and, per_task, its dense parameters) in the model."""
        self.masks.set(self.task_masks[t])
        if self.cfg.dense_params == "per_task":
            self._load_dense_state(self.task_params[t])

    def sparsity_report(self) -> dict[str, Any]:
        """The current mask's counted density, each task's, and the share of weights used
        by any task (the union of the stored masks)."""
        report = self.masks.report()
        report["task_densities"] = list(self.task_densities)
        if self.task_masks:
            used = sum(
                int(functools.reduce(torch.logical_or, [m[n] for m in self.task_masks]).sum())
                for n in self.masks.layers
            )
            report["union_density"] = used / max(int(report["total"]), 1)
        return report

    # ----------------------------------------------------------- checkpoint
    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        device = next(self.model.parameters()).device
        self.task_masks = [{n: m.to(device).bool() for n, m in d.items()} for d in self.task_masks]
        self.dense_store = {n: w.to(device) for n, w in self.dense_store.items()}
        self.fired = {n: f.to(device).bool() for n, f in self.fired.items()}
        self.task_params = [{k: v.to(device) for k, v in d.items()} for d in self.task_params]
        self.masks.fired = {n: f.clone() for n, f in self.fired.items()}
        self.task_densities = [float(d) for d in self.task_densities]
        self.task_updates = [int(u) for u in self.task_updates]
        self._in_task = False

    # -------------------------------------------------------------- helpers
    @torch.no_grad()
    def _load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for name, layer in self.masks.layers.items():
            layer.weight.copy_(weights[name])

    def _dense_state(self) -> dict[str, torch.Tensor]:
        state = self.model.backbone.state_dict()
        return {k: state[k].detach().clone() for k in self._dense_keys}

    @torch.no_grad()
    def _load_dense_state(self, saved: dict[str, torch.Tensor]) -> None:
        state = self.model.backbone.state_dict()
        for k, v in saved.items():
            state[k].copy_(v)

    @torch.no_grad()
    def _zero_outside_masks(self) -> None:
        """Zero the stored weights outside the current masks and, as the official
        ``apply_mask`` does, SGD's momentum there; Adam's moments outside the mask are kept
        (``MaskSet.apply(optimizer)`` would zero them too, and then momentum growth would
        score every inactive position 0 and grow the lowest positions)."""
        self.masks.apply()
        for layer in self.masks.layers.values():
            buffer = self.optimizer.state.get(layer.weight, {}).get("momentum_buffer")
            if isinstance(buffer, torch.Tensor):
                buffer.mul_(layer.mask)

    def _old_rows(self) -> list[int]:
        current = set(self.current_classes)
        return [c for c in range(self.model.head.num_classes) if c not in current]

    @torch.no_grad()
    def _hold_frozen(self) -> dict[str, torch.Tensor]:
        """Values weight decay would move although their gradient is frozen: earlier
        tasks' weights and the head rows of earlier classes."""
        held = {n: self.masks.layers[n].weight[f].clone() for n, f in self._frozen.items()}
        rows = self._old_rows()
        if rows:
            fc: nn.Linear = self.model.head.fc
            held["head.weight"] = fc.weight[rows].clone()
            held["head.bias"] = fc.bias[rows].clone()
        return held

    @torch.no_grad()
    def _restore_frozen(self, held: dict[str, torch.Tensor]) -> None:
        for n, f in self._frozen.items():
            self.masks.layers[n].weight[f] = held[n]
        rows = self._old_rows()
        if rows:
            fc: nn.Linear = self.model.head.fc
            fc.weight[rows] = held["head.weight"]
            fc.bias[rows] = held["head.bias"]
