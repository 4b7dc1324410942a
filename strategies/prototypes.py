"""Replay-free baselines for pretrained backbones: classifiers built from feature statistics.

- ``simplecil`` (SimpleCIL, Zhou et al., "Revisiting Class-Incremental Learning with
  Pre-Trained Models", IJCV 2024; official code LAMDA-CL/LAMDA-PILOT models/simplecil.py and
  zhoudw-zdw/RevisitingCIL): the backbone stays frozen and nothing trains. At each experience
  every new class gets a prototype, the mean backbone feature of its training samples
  (eval transforms, eval mode: PILOT's ``replace_fc``); the logits are the cosine similarities
  of a sample's feature to the prototypes (PILOT's ``CosineLinear`` with its ``sigma``, which
  is 1 and never trained in SimpleCIL: ``logits = cos``).
- ``fsa`` (First Session Adaptation, Panos et al., ICCV 2023; official code aresPanos/fsa
  src/methods/cil_trainer.py, src/utils.py): on the first experience only the whole body is
  fine-tuned with a temporary linear head on dropout features (Adam, MultiStepLR), then frozen.
  The classifier is an LDA head over every experience's features: ``S`` = the covariance of all
  training features seen (one covariance of all classes together, not a within-class one) plus
  ``ridge`` * I, ``mu_c`` the class means, ``logit_c = f S^-1 mu_c - mu_c^T S^-1 mu_c / 2``
  (Cholesky solve, ``compute_lda_head``). The official code recomputes the head from all seen
  data at each session with the frozen body; here the sufficient statistics (counts, sums,
  sum of outer products, in float64) are updated per experience, which gives the same head.

Both heads (:class:`PrototypeHead`, :class:`LDAHead`) keep their statistics as buffers of the
model, so a checkpoint carries them with the model's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from clbench.strategies.base import CLStrategy, StrategyConfig
from torch import nn

from clbench.checks import check_choice, check_positive, check_range
from clbench.data import materialise, read_batches
from clbench.errors import ConfigError
from clbench.models import ClassifierModel, GrowingHead
from clbench.seeding import derived_generator

ADAPT = ("body", "none")
_ADAPT_HEAD_TAG = 0xF5A  # derives the adaptation head's init generator from the run's seed


# ------------------------------------------------------------------------------ heads
class PrototypeHead(GrowingHead):
    """Cosine similarity to class prototypes (the mean feature of each class).

    ``sums`` (C, D) and ``counts`` (C,) are float64 buffers; prototype ``c`` is
    ``sums[c] / counts[c]``. A class without a sample yet is never predicted (logit -inf).
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("sums", torch.zeros(0, in_features, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Ensure at least ``num_classes`` classes (new ones without samples)."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return False
        self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.in_features)])
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        return True

    def reset(self) -> None:
        """Forget every class."""
        self.sums = self.sums.new_zeros(0, self.in_features)
        self.counts = self.counts.new_zeros(0)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``feats`` (N, D) of classes ``labels`` (N,) to the class statistics."""
        f = feats.to(self.sums.device, torch.float64)
        y = labels.to(self.sums.device, torch.long)
        self.sums.index_add_(0, y, f)
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def prototypes(self) -> torch.Tensor:
        """(C, D) class means, float64 (zero rows for classes without samples)."""
        return self.sums / self.counts.clamp(min=1.0)[:, None]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        proto = self.prototypes().to(feats.dtype)
        logits = F.linear(F.normalize(feats, dim=1), F.normalize(proto, dim=1))
        return logits.masked_fill(self.counts == 0, float("-inf"))


class LDAHead(GrowingHead):
    """Linear discriminant analysis over a shared covariance (FSA's ``compute_lda_head``).

    Float64 buffers: ``count`` (scalar), ``total`` (D,) and ``outer`` (D, D), the sufficient
    statistics of every feature seen; ``class_sums`` (C, D), ``class_counts`` (C,); and the head
    they give, ``coef`` (D, C) and ``bias`` (C,), kept current by :meth:`update`.
    ``logits = f coef - bias / 2``; a class without a sample yet is never predicted (-inf).
    """

    def __init__(self, in_features: int, ridge: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.ridge = ridge
        d, f64 = in_features, torch.float64
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.register_buffer("total", torch.zeros(d, dtype=f64))
        self.register_buffer("outer", torch.zeros(d, d, dtype=f64))
        self.register_buffer("class_sums", torch.zeros(0, d, dtype=f64))
        self.register_buffer("class_counts", torch.zeros(0, dtype=f64))
        self.register_buffer("coef", torch.zeros(d, 0, dtype=f64))
        self.register_buffer("bias", torch.zeros(0, dtype=f64))

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.shape[0])

    @torch.no_grad()
    def grow(self, num_classes: int) -> bool:
        """Ensure at least ``num_classes`` classes (new ones without samples)."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return False
        d = self.in_features
        self.class_sums = torch.cat([self.class_sums, self.class_sums.new_zeros(extra, d)])
        self.class_counts = torch.cat([self.class_counts, self.class_counts.new_zeros(extra)])
        self.coef = torch.cat([self.coef, self.coef.new_zeros(d, extra)], dim=1)
        self.bias = torch.cat([self.bias, self.bias.new_zeros(extra)])
        return True

    def reset(self) -> None:
        """Forget every class and every feature statistic."""
        d = self.in_features
        self.count = torch.zeros_like(self.count)
        self.total = torch.zeros_like(self.total)
        self.outer = torch.zeros_like(self.outer)
        self.class_sums = self.class_sums.new_zeros(0, d)
        self.class_counts = self.class_counts.new_zeros(0)
        self.coef = self.coef.new_zeros(d, 0)
        self.bias = self.bias.new_zeros(0)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``feats`` (N, D) of classes ``labels`` (N,) to the statistics (no refresh)."""
        f = feats.to(self.total.device, torch.float64)
        y = labels.to(self.total.device, torch.long)
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.class_sums.index_add_(0, y, f)
        self.class_counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    def covariance(self) -> torch.Tensor:
        """The covariance of every feature seen (``torch.cov``: unbiased, biased for one
        sample), float64, without the ridge."""
        n = float(self.count)
        mean = self.total / max(n, 1.0)
        scatter = self.outer - n * torch.outer(mean, mean)
        return scatter / (n - 1.0 if n > 1 else 1.0)

    def class_means(self) -> torch.Tensor:
        """(C, D) class means, float64 (zero rows for classes without samples)."""
        return self.class_sums / self.class_counts.clamp(min=1.0)[:, None]

    @torch.no_grad()
    def refresh(self) -> None:
        """Solve the head from the statistics: ``coef = (cov + ridge I)^-1 mu^T``,
        ``bias_c = mu_c . coef_c`` (Cholesky)."""
        eye = torch.eye(self.in_features, dtype=torch.float64, device=self.outer.device)
        chol = torch.linalg.cholesky(self.covariance() + self.ridge * eye)
        means = self.class_means().T  # (D, C)
        self.coef = torch.cholesky_solve(means, chol)
        self.bias = (self.coef * means).sum(0)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(feats.device.type, enabled=False):  # float64 statistics
            logits = feats.to(torch.float64) @ self.coef - 0.5 * self.bias
        logits = logits.masked_fill(self.class_counts == 0, float("-inf"))
        return logits.to(torch.float32)


# ------------------------------------------------------------------------------ shared
class _StatisticsLearner(CLStrategy):
    """A strategy whose classifier is a head of feature statistics (``model.head``), updated
    after each experience from the experience's training samples (eval transforms, eval
    mode, ``eval_batch_size`` at a time, in dataset order)."""

    def _check_model(self, model: Any) -> None:
        if not isinstance(model, ClassifierModel):
            raise ConfigError(
                f"strategy {self.cfg.name} needs a backbone that returns pooled features "
                f"(a ViT or a CNN), not a {type(model).__name__}: choose e.g. "
                "backbone=micro_vit"
            )

    def feature_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) of the current experience's training samples, non-augmented."""
        dataset = self.experience.dataset.eval()
        size = self.cfg.eval_batch_size
        if self.in_memory:
            x, y = materialise(dataset)[:2]
            batches: Iterator[Any] = (
                (x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)
            )
        else:
            n = len(dataset)
            chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
            workers = int(getattr(self.experience, "loader_workers", 0))  # the scenario's
            batches = read_batches(dataset, chunks, workers)
        backbone = self.model.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    yield backbone(batch[0].to(self.device)), batch[1]
        finally:
            backbone.train(was_training)

    def update_statistics(self) -> None:
        """Add the current experience's features to the head."""
        for feats, labels in self.feature_batches():
            self.model.head.update(feats, labels)

    def make_optimizer(self, **kwargs: Any) -> None:
        if self.trainable_parameters():  # else keep the placeholder: nothing trains
            super().make_optimizer(**kwargs)

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.update_statistics()
        super()._after_training_exp(**kwargs)


# ------------------------------------------------------------------------------ SimpleCIL
@dataclass
class SimpleCILConfig(StrategyConfig):
    """SimpleCIL trains nothing: of the shared options only ``eval_batch_size`` (the batch of
    the prototype pass and of evaluation) is used."""


class SimpleCIL(_StatisticsLearner):
    """Frozen pretrained backbone, nothing trains: cosine similarity to class-mean prototypes.

    (SimpleCIL, PILOT's ``simplecil``.) ``num_trainable_parameters`` is 0: the prototypes
    are computed, not trained."""

    Config = SimpleCILConfig
    cfg: SimpleCILConfig

    def prepare_model(self, model: ClassifierModel) -> None:
        self._check_model(model)
        model.backbone.requires_grad_(False)
        model.head = PrototypeHead(model.head.in_features)

    def adapt_to_experience(self) -> None:
        self.train_epochs = 0  # no training loop: the prototypes are computed, not trained

    def num_inference_parameters(self) -> int:
        """The backbone plus the prototypes (one D-vector per class: the head's weights)."""
        head = self.model.head
        return super().num_inference_parameters() + head.num_classes * head.in_features


# ------------------------------------------------------------------------------ FSA
@dataclass
class FSAConfig(StrategyConfig):
    """Options of ``fsa``. The dataclass defaults are the official high-shot setting
    (aresPanos/fsa); conf/strategy/fsa.yaml shortens the adaptation for the embedded default."""

    epochs: int = 200  # of the first experience's adaptation
    batch_size: int = 256
    lr: float = 5e-3
    # what the first experience adapts: "body" (FSA: every backbone parameter) or "none"
    # (the LDA head on the pretrained features)
    adapt: str = "body"
    # first-experience epochs at which the learning rate is multiplied by ``gamma``
    # (torch MultiStepLR, stepped after each epoch); [] = none
    milestones: list[int] = field(default_factory=lambda: [50, 100, 150])
    gamma: float = 0.7
    # dropout on the features before the temporary linear head of the adaptation
    dropout: float = 0.5
    # added to the diagonal of the feature covariance of the LDA head
    ridge: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.adapt", self.adapt, ADAPT)
        for m in self.milestones:
            check_positive("strategy.milestones", m)
        check_positive("strategy.gamma", self.gamma)
        check_range("strategy.dropout", self.dropout, 0.0, 1.0)
        check_positive("strategy.ridge", self.ridge)
        if self.milestones and self.lr_schedule != "constant":
            raise ConfigError(
                f"strategy.milestones={list(self.milestones)} needs strategy.lr_schedule="
                f"constant, got {self.lr_schedule!r}; set strategy.milestones=[] to use "
                f"{self.lr_schedule!r}"
            )


class FSA(_StatisticsLearner):
    """Fine-tune the body on the first experience only, then an LDA head on frozen features.

    (First Session Adaptation.) The temporary linear head of the adaptation counts among the
    trainable parameters of the first experience and is dropped after it."""

    Config = FSAConfig
    cfg: FSAConfig

    def prepare_model(self, model: ClassifierModel) -> None:
        self._check_model(model)
        model.head = LDAHead(model.head.in_features, ridge=self.cfg.ridge)
        model.backbone.requires_grad_(self.cfg.adapt == "body")
        self.adapt_fc: nn.Linear | None = None
        self._positions = torch.zeros(0, dtype=torch.long)
        self.feature_dropout = nn.Dropout(self.cfg.dropout)

    def adapting(self) -> bool:
        """True while the first experience adapts the body."""
        return self.cfg.adapt == "body" and int(self.clock.train_exp_counter) == 0

    def adapt_to_experience(self) -> None:
        if not self.adapting():
            self.model.backbone.requires_grad_(False)
            self.adapt_fc = None
            self.train_epochs = 0  # the body is frozen: only the LDA statistics grow
            return
        self.train_epochs = self.cfg.epochs
        classes = self.current_classes
        if len(classes) < 2:
            raise ConfigError(
                f"strategy fsa with adapt=body needs two or more classes in the first "
                f"experience, got {len(classes)} (a cross-entropy over one class trains "
                "nothing); use strategy.adapt=none or a larger first experience"
            )
        self._positions = torch.full((self.model.head.num_classes,), -1, dtype=torch.long)
        self._positions[classes] = torch.arange(len(classes))
        self._positions = self._positions.to(self.device)
        # the temporary head of the first session's classes (torch's nn.Linear init, drawn
        # from a generator of the run's seed)
        fc = nn.Linear(self.model.head.in_features, len(classes))
        g = derived_generator(self.seed, _ADAPT_HEAD_TAG)
        with torch.no_grad():
            nn.init.kaiming_uniform_(fc.weight, a=math.sqrt(5), generator=g)
            bound = 1.0 / math.sqrt(fc.in_features)
            nn.init.uniform_(fc.bias, -bound, bound, generator=g)
        self.adapt_fc = fc.to(self.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        return params + (list(self.adapt_fc.parameters()) if self.adapt_fc is not None else [])

    def _before_training_epoch(self, **kwargs: Any) -> None:
        if self.cfg.milestones:  # MultiStepLR: epoch e at lr * gamma^(milestones <= e)
            e = int(self.clock.train_exp_epochs)
            self._set_lr(self.cfg.gamma ** sum(m <= e for m in self.cfg.milestones))
        super()._before_training_epoch(**kwargs)

    def forward(self) -> torch.Tensor:
        if self.is_training and self.adapt_fc is not None:
            return self.adapt_fc(self.feature_dropout(self.model.backbone(self.mb_x)))
        return super().forward()

    def criterion(self) -> torch.Tensor:
        if self.is_training and self.adapt_fc is not None:
            target = self._positions[self.mb_y]
            return F.cross_entropy(self.mb_output, target, label_smoothing=self.cfg.label_smoothing)
        return super().criterion()

    def update_statistics(self) -> None:
        super().update_statistics()
        self.model.head.refresh()

    def _after_training_exp(self, **kwargs: Any) -> None:
        if self.adapting():  # the first session is over: freeze the adapted body
            self.model.backbone.requires_grad_(False)
            self.adapt_fc = None
            self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=self.cfg.lr)
        super()._after_training_exp(**kwargs)

    def num_inference_parameters(self) -> int:
        """The backbone plus the LDA head's weights and biases (D x C + C)."""
        head = self.model.head
        return super().num_inference_parameters() + head.num_classes * (head.in_features + 1)
