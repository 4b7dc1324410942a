"""CoMEL (Lee et al., ICCV 2025; official code Hyun1A/CoMEL): continual MIL with enhanced
localisation.

Three parts; the aggregator, GDAT (grouped double attention), is a backbone
(``backbone=gdat``); this strategy adds the other two and runs on any aggregator that
leaves ``attention`` (N,) and ``instances`` (N, hidden) after its forward:

- **BPPL**, bag-prototype pseudo-labelling for an instance loss (:func:`bppl_loss`). The
  instance classifier is the official one: the bag's attention, min-max normalised to a
  probability of "positive" per instance (:func:`instance_probabilities`); it learns from
  the pseudo-labels, so attention doubles as the localisation map.
- **OWLoRA** (:class:`~clbench.adapters.owlora.OWLoRA`): the whole aggregator trains on
  task 0; from task 1 on its linears are frozen at their 99%-energy truncated SVD and each
  task adds a rank-16 LoRA with per-rank scales, trained with gradients projected off the
  earlier spaces and an orthonormality penalty. Only the newest LoRAs and the bag
  classifier (the head) train.

Loss per bag: ``bag_weight * CE + inst_weight * BPPL + ortho_weight * penalty`` (BPPL on
every task, the penalty and the gradient projection from task 1 on, when the first LoRAs
exist: the official trainer adds them after task 0), one bag per step, Adam with a
per-task cosine schedule, as in the official ``cdatmil_ppl_owlora`` trainer. BPPL's
threshold tau2 starts at ``tau`` and after every epoch becomes ``(1 + tau * quality / n) /
2`` (:func:`next_tau2`); like the official trainer's attribute it carries over from one
task to the next.

The official code gives each task its own 2-way classifier and freezes the earlier ones
(labels ``2t``, ``2t+1``). On the growing head that is ``freeze_old_classes``: the rows of
the classes of earlier tasks are put back after every step (in the binary setting every
task has the same two classes, so the whole head trains throughout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from clbench.strategies.base import mask_logits
from clbench.strategies.mil import MILConfig, MILStrategy

from clbench.adapters.owlora import OWLoRA
from clbench.checks import check_positive, check_range
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.precision import full_precision
from clbench.seeding import derived_generator

#: added to the instance probabilities before the log (the official 1e-10)
LOG_EPS = 1e-10


@dataclass
class CoMELConfig(MILConfig):
    # official: 100 epochs per task; the embedded default trains fewer (conf/strategy/comel.yaml)
    epochs: int = 30
    lr_schedule: str = "cosine"  # official: CosineAnnealingLR(T_max=epochs) stepped per epoch
    # OWLoRA
    rank: int = 16  # the official model's LoRA rank (3x on a fused qkv)
    svd_energy: float = 0.99  # share of the squared singular values the truncation keeps
    # also project off the truncated weights' singular vectors (the unfilled slot of the
    # official code); false: off the earlier tasks' LoRAs only, as the official code does
    project_base: bool = False
    ortho_weight: float = 1.0  # weight of the orthonormality penalty (lambda3)
    # BPPL
    bag_conf: float = 0.95  # tau1: a bag's softmax confidence must exceed this
    tau: float = 0.5  # initial tau2, and the weight of the epoch's quality in its update
    temperature: float = 1.0  # T of softmax(cos(instance, prototypes) / T)
    inst_weight: float = 1.0  # weight of the instance (pseudo-label) loss
    bag_weight: float = 1.0  # weight of the bag cross-entropy
    inst_start_epoch: int = 0  # the instance loss counts from this epoch of each task on
    # keep the head rows of earlier tasks' classes fixed (the official per-task classifiers)
    freeze_old_classes: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.rank", self.rank)
        if not 0.0 < self.svd_energy <= 1.0:
            raise ConfigError(
                f"invalid value for strategy.svd_energy: {self.svd_energy!r}; must be in (0, 1]"
            )
        check_positive("strategy.ortho_weight", self.ortho_weight, allow_zero=True)
        check_range("strategy.bag_conf", self.bag_conf, 0.0, 1.0)
        check_range("strategy.tau", self.tau, 0.0, 1.0)
        check_positive("strategy.temperature", self.temperature)
        check_positive("strategy.inst_weight", self.inst_weight, allow_zero=True)
        check_positive("strategy.bag_weight", self.bag_weight, allow_zero=True)
        check_positive("strategy.inst_start_epoch", self.inst_start_epoch, allow_zero=True)


def instance_probabilities(attention: torch.Tensor) -> torch.Tensor:
    """(N, 2) ``[1 - p, p]`` with ``p = (a - min a) / (max a + 1e-10)``: the official
    instance classifier on the softmax attention ``a`` (N,) (it divides by ``max a``, not
    by ``max a - min a``, so the top instance gets slightly less than 1)."""
    lo, hi = attention.min(), attention.max()
    p = (attention - lo) / (hi + LOG_EPS)
    return torch.stack([1.0 - p, p], dim=1)


@torch.no_grad()
def bppl_pseudo_labels(
    attention: torch.Tensor, instances: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels (N,) and their confidence (N,) from the bag prototypes.

    Bag prototype ``z = sum_i a_i h_i`` (the attention-pooled embedding), reverse
    prototype ``z_rev = sum_i (1 - a_i) h_i / sum_i (1 - a_i)``; an instance's label is the
    argmax of ``softmax([cos(h_i, z_rev), cos(h_i, z)] / T)`` (1: positive, like the bag)
    and its confidence that maximum.
    """
    a, h = attention.detach(), instances.detach()
    bag = a @ h
    reverse = 1.0 - a
    reverse = (reverse / reverse.sum()) @ h
    prototypes = F.normalize(torch.stack([reverse, bag]), dim=1)
    cos = F.normalize(h, dim=1) @ prototypes.T
    confidence, labels = torch.softmax(cos / temperature, dim=1).max(dim=1)
    return labels, confidence


def is_positive(label: int) -> bool:
    """The official "tumour" test, ``label % 2 == 1``: label 1 in the binary setting, the
    second class (2t + 1) of each task's pair in the class-incremental one."""
    return label % 2 == 1


def bppl_loss(
    logits: torch.Tensor,
    label: int,
    attention: torch.Tensor,
    instances: torch.Tensor,
    tau2: float,
    bag_conf: float = 0.95,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """BPPL's instance loss of one bag and the number of instances it kept.

    Only a correctly classified positive bag (:func:`is_positive`) whose softmax
    confidence exceeds ``bag_conf`` contributes; of its instances those whose pseudo-label
    confidence (:func:`bppl_pseudo_labels`) exceeds ``tau2`` are kept, and the loss is
    ``(kept / N) * NLL(log(instance_probabilities + 1e-10), pseudo-labels)`` over them
    (gradient through the attention only). Otherwise 0 (no gradient) and 0 kept.
    """
    zero = attention.new_zeros(())
    n = attention.shape[0]
    conf, pred = torch.softmax(logits.detach().float(), dim=-1).max(dim=-1)
    if n < 2 or int(pred) != label or not is_positive(label) or float(conf) <= bag_conf:
        return zero, 0
    pseudo, confidence = bppl_pseudo_labels(attention, instances, temperature)
    keep = confidence > tau2
    kept = int(keep.sum())
    if kept == 0:
        return zero, 0
    log_p = torch.log(instance_probabilities(attention)[keep] + LOG_EPS)
    return (kept / n) * F.nll_loss(log_p, pseudo[keep]), kept


def next_tau2(tau: float, quality: float, n_bags: int) -> float:
    """tau2 after an epoch: ``(1 + tau * quality / n) / 2``, ``quality`` the epoch's sum of
    the softmax confidence of its correctly classified bags, ``n`` its number of bags."""
    return 0.5 * (1.0 + tau * quality / n_bags)


class CoMEL(MILStrategy):
    """CoMEL: BPPL instance loss + OWLoRA on the aggregator (see the module docstring)."""

    Config = CoMELConfig
    cfg: CoMELConfig
    kind: ClassVar[str] = "mil"

    def prepare_model(self, model: ClassifierModel) -> None:
        self.owlora = OWLoRA(
            model.backbone, self.cfg.rank, self.cfg.svd_energy, self.cfg.project_base
        )
        model.backbone.requires_grad_(True)  # task 0 trains the whole aggregator
        self.tasks_seen = 0
        self.tau2 = float(self.cfg.tau)  # the official initial tau2 is tau
        self._quality = 0.0
        self._bags = 0
        self.instances_kept = 0  # instances BPPL kept in the current (or last) epoch
        self._frozen_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {
            "tasks_seen": self.tasks_seen,
            "tau2": self.tau2,
            "svd_ranks": dict(self.owlora.svd_ranks),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.tasks_seen = int(state["tasks_seen"])
        self.tau2 = float(state["tau2"])
        self.owlora.svd_ranks = {k: int(v) for k, v in state["svd_ranks"].items()}

    @property
    def task(self) -> int:
        """The index of the task being (or last) trained."""
        return self.tasks_seen - 1

    # ------------------------------------------------------------ task start
    def adapt_to_experience(self) -> None:
        if self.tasks_seen > 0:
            if not self.owlora.truncated:
                self.owlora.truncate()
            self.model.backbone.requires_grad_(False)
            generator = derived_generator(self.seed, self.tasks_seen)
            self.owlora.add_task_blocks(generator)
        self._snapshot_old_rows()
        self.tasks_seen += 1

    def _snapshot_old_rows(self) -> None:
        self._frozen_rows = None
        fc = getattr(self.model.head, "fc", None)
        if not self.cfg.freeze_old_classes or fc is None:
            return
        current = set(self.current_classes)
        old = [c for c in range(fc.out_features) if c not in current]
        if old:
            rows = torch.tensor(old, device=fc.weight.device)
            self._frozen_rows = (
                rows,
                fc.weight.detach()[rows].clone(),
                fc.bias.detach()[rows].clone(),
            )

    # ------------------------------------------------------------ training
    def _before_training_epoch(self, **kwargs: Any) -> None:
        self._quality, self._bags, self.instances_kept = 0.0, 0, 0
        super()._before_training_epoch(**kwargs)

    def criterion(self) -> torch.Tensor:
        bag_loss = super().criterion()
        if not self.is_training:
            return bag_loss
        logits = self.mb_output
        if self.cfg.loss_mask == "current":
            logits = mask_logits(logits, self.current_classes)
        label = int(self.mb_y[0])
        conf, pred = torch.softmax(logits.detach()[0], dim=-1).max(dim=-1)
        self._bags += 1
        if int(pred) == label:
            self._quality += float(conf)
        loss = self.cfg.bag_weight * bag_loss
        aggregator = self.model.backbone
        attention = getattr(aggregator, "attention", None)
        instances = getattr(aggregator, "instances", None)
        if attention is None or instances is None:
            raise ConfigError(
                f"comel needs an attention aggregator (backbone=gdat or abmil); "
                f"{type(aggregator).__name__} leaves no attention / instances"
            )
        if self.cfg.inst_weight > 0 and self.clock.train_exp_epochs >= self.cfg.inst_start_epoch:
            with full_precision():  # pseudo-labels from prototype cosines: in float32
                inst_loss, kept = bppl_loss(
                    logits[0],
                    label,
                    attention.float(),
                    instances.float(),
                    self.tau2,
                    self.cfg.bag_conf,
                    self.cfg.temperature,
                )
            self.instances_kept += kept
            loss = loss + self.cfg.inst_weight * inst_loss
        if self.task >= 1 and self.cfg.ortho_weight > 0:
            loss = loss + self.cfg.ortho_weight * self.owlora.penalty().to(loss.device)
        return loss

    def _after_backward(self, **kwargs: Any) -> None:
        if self.task >= 1:
            self.owlora.project_gradients()
        super()._after_backward(**kwargs)

    def _after_update(self, **kwargs: Any) -> None:
        if self._frozen_rows is not None:
            rows, weight, bias = self._frozen_rows
            fc = self.model.head.fc
            with torch.no_grad():
                fc.weight[rows] = weight
                fc.bias[rows] = bias
        super()._after_update(**kwargs)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        if self._bags > 0:
            self.tau2 = next_tau2(self.cfg.tau, self._quality, self._bags)
        super()._after_training_epoch(**kwargs)

    # ------------------------------------------------------------ parameters
    def num_inference_parameters(self) -> int:
        """Aggregator + head parameters once every LoRA is merged into its base weight."""
        lora = sum(
            p.numel() for layer in self.owlora.layers.values() for p in layer.blocks.parameters()
        )
        return super().num_inference_parameters() - lora
