"""The classic class-incremental baselines on Avalanche's implementations: EWC (``ewc``),
Learning without Forgetting (``lwf``), GDumb (``gdumb``) and iCaRL (``icarl``).

Each is a :class:`~clbench.strategies.base.CLStrategy` (the growing head, clbench's
in-memory batches, the optimizer factory, checkpoints) composed with Avalanche 0.6's
pieces; defaults follow mammoth (github.com/aimagelab/mammoth, ``models/ewc_on.py``,
``lwf.py``, ``gdumb.py``, ``icarl.py``, ``utils/best_args.py``), the original GDumb
(github.com/drimpossible/GDumb) and iCaRL (github.com/srebuffi/iCaRL) code; each YAML names
the file and line of every value.

- ``ewc`` (Kirkpatrick et al., PNAS 2017; online form, Schwarz et al. 2018 = mammoth's
  ``ewc_on``): Avalanche's ``EWCPlugin``. After each experience the importances (squared
  gradients of the cross-entropy over the experience's training samples, model in eval
  mode) are added to the decayed earlier ones (``mode: online``) and the parameters saved;
  from the second experience the loss is ``CE + ewc_lambda sum_i F_i (p_i - p*_i)^2``.
- ``lwf`` (Li and Hoiem, TPAMI 2017; mammoth's ``lwf``): Avalanche's ``LwFPlugin``. Loss
  ``CE + alpha KL(softmax(teacher / T) || softmax(model / T))`` over the classes of the
  earlier experiences, the teacher being the model as the previous experience left it.
- ``gdumb`` (Prabhu et al., ECCV 2020): a class-balanced memory (Avalanche's
  ``ClassBalancedBuffer``, the storage policy of ``GDumbPlugin``) filled from each
  experience before training; the model restarts from its initial weights at every
  experience and trains on the memory only. GDumb's trainer: SGD with one warm-up epoch at
  lr / 10 then cosine annealing with warm restarts (T_0 = 1, T_mult = 2) down to
  ``min_lr``, gradient clipping, optional CutMix.
- ``icarl`` (Rebuffi et al., CVPR 2017): Avalanche's ``ICaRLLossPlugin`` (sigmoid BCE on
  one-hot targets whose old-class entries are the previous model's sigmoid outputs),
  exemplars chosen by herding (Avalanche's ``HerdingSelectionStrategy`` on L2-normalised
  features), ``mem_size // seen classes`` exemplars per class (a class's memory shrinks by
  keeping the head of its herding order), the experience's data trained together with every
  exemplar, and prediction by the nearest mean of exemplars (Avalanche's ``NCMClassifier``:
  class means of normalised features, averaged with those of the horizontally flipped
  exemplars, as in iCaRL's and mammoth's code).

Where Avalanche's pieces are not used as they are, and why:

- LwF and iCaRL: Avalanche's plugins copy the model after each experience as it is (train
  mode; ``ICaRLLossPlugin`` then ``load_state_dict``-s the grown model into its old copy,
  which fails on a growing head). Here the teacher is a frozen eval-mode copy of the model
  made at the start of each experience from the second on (after the head grew; its new
  units are never read), as mammoth's teachers are (eval mode), and a resumed run rebuilds
  the same teacher from the checkpoint's model. The plugins' ``after_training_exp`` is off.
- GDumb: ``GDumbPlugin`` is not attached: it replaces ``strategy.model`` by a deep copy at
  every experience (anything holding the model, e.g. clbench's FLOP and backbone-pass
  counters, would follow a stale one), fills its buffer with the global RNG and keeps it as
  untagged data a checkpoint cannot store. Its behaviour is kept: the same
  ``ClassBalancedBuffer(mem_size, adaptive_size=True)`` updated with the experience before
  training (through ``replay.SampleMemory``: seeded, each sample tagged with its
  reference), training on the buffer only, the model reset to its initial weights in place.
- iCaRL: Avalanche's ``ICaRL`` strategy needs a ``TrainEvalModel`` and the benchmark's
  ``n_classes_per_exp`` / ``classes_order``, and keeps exemplars as input tensors; here the
  exemplars are references (experience, index) in herding order, and its plugin's herding
  (Welling's ``w_t`` iteration, as iCaRL's code) is replaced by
  ``HerdingSelectionStrategy`` (the paper's Algorithm 4: each step adds the sample that
  brings the exemplars' mean closest to the class mean), which is mammoth's herding.

Where clbench differs from the official code:

- EWC: importances are Avalanche's empirical Fisher, the squared gradient of the
  cross-entropy of ``fisher_batch_size`` samples (default 1: per-sample squared gradients
  as mammoth's), averaged; mammoth weights each sample's squared gradient by p(y | x).
  The head grows: new units have no importance (mammoth's head has every class from the
  start, and its CE pushes down the future classes' logits).
- LwF: the teacher's logits are computed on each mini-batch (mammoth: once per experience,
  on the non-augmented images); with no augmentation (every embedded scenario) they are
  the same. The head warm-up (``warmup_epochs``: only the new units train, on the current
  classes, backbone frozen, plain SGD at ``lr``; the LwF paper's and mammoth's, absent from
  Avalanche) runs before the training.
- GDumb: retrained after every experience (Avalanche; the original code trains once, on
  the final memory, and mammoth only after the last task); the memory is a per-class
  reservoir sample (the original keeps each class's first samples, evicting at random
  from the largest class). The original trains in half precision.
- iCaRL: ``mem_size // seen classes`` exemplars per class (mammoth's ``fill_buffer``;
  iCaRL's code and Avalanche round up, so the memory may exceed ``mem_size``); its weight
  decay ``+ 1e-5 sum p^2`` in the loss is SGD weight decay ``2e-5`` (the same gradient).

Seeding and checkpoints: only GDumb draws (the memory's reservoir weights and CutMix), from
generators derived from (run seed, experience); the others are deterministic given the
batches. Checkpoints hold EWC's importances and saved parameters, LwF's and iCaRL's past
classes (the teacher is rebuilt), GDumb's initial weights and memory (references and
reservoir weights), iCaRL's exemplar references and class means: tensors and JSON only.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from avalanche.models import NCMClassifier
from avalanche.training.losses import ICaRLLossPlugin
from avalanche.training.plugins import EWCPlugin, LwFPlugin
from avalanche.training.storage_policy import HerdingSelectionStrategy
from avalanche.training.utils import ParamData
from clbench.strategies.base import CLStrategy, StrategyConfig, mask_logits, training_ce
from clbench.strategies.erasure import frozen_copy
from clbench.strategies.mil_baselines import ewc_state, load_ewc_state
from clbench.strategies.replay import BUFFER_STREAM, SampleMemory
from torch import nn

from clbench.checks import check_choice, check_positive, check_range
from clbench.data import materialise, read_batches
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.seeding import derived_generator

EWC_MODES = ("online", "separate")
#: ``derived_generator(seed, experience, STREAM)`` key of GDumb's CutMix draws
CUTMIX_STREAM = 3


# ------------------------------------------------------------------------ EWC
@dataclass
class EWCConfig(StrategyConfig):
    """mammoth's ``ewc_on`` on seq-cifar10 (SGD, no momentum), 5 epochs (the embedded
    default's; mammoth: 50)."""

    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.0
    # penalty weight (mammoth --e_lambda)
    ewc_lambda: float = 10.0
    # online: one importance, decayed (mammoth's ewc_on); separate: one per experience
    mode: str = "online"
    # online: importance <- decay_factor x importance + new (mammoth --gamma)
    decay_factor: float = 1.0
    # samples per squared gradient in the importance pass (1: per-sample, mammoth's)
    fisher_batch_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.ewc_lambda", self.ewc_lambda, allow_zero=True)
        check_choice("strategy.mode", self.mode, EWC_MODES)
        check_positive("strategy.decay_factor", self.decay_factor, allow_zero=True)
        check_positive("strategy.fisher_batch_size", self.fisher_batch_size)


class EWCImportances(EWCPlugin):
    """Avalanche's ``EWCPlugin`` whose importance pass uses batches of ``fisher_batch_size``
    samples (Avalanche: the training batch size) and keeps the model's train / eval mode."""

    def __init__(self, cfg: EWCConfig) -> None:
        online = cfg.mode == "online"
        super().__init__(
            cfg.ewc_lambda, mode=cfg.mode, decay_factor=cfg.decay_factor if online else None
        )
        self.fisher_batch_size = cfg.fisher_batch_size

    def compute_importances(
        self,
        model: nn.Module,
        criterion: Any,
        optimizer: Any,
        dataset: Any,
        device: Any,
        batch_size: int,
        num_workers: int = 0,
    ) -> dict[str, ParamData]:
        was_training = model.training
        try:
            return super().compute_importances(
                model, criterion, optimizer, dataset, device, self.fisher_batch_size, num_workers
            )
        finally:
            model.train(was_training)


class EWC(CLStrategy):
    """Online EWC with Avalanche's EWCPlugin: an importance-weighted pull to the anchor.

    Importances after each experience (per-sample squared gradients by default), the
    quadratic penalty from the second experience on."""

    Config = EWCConfig
    cfg: EWCConfig

    def __init__(
        self,
        *,
        model: ClassifierModel,
        cfg: EWCConfig,
        plugins: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.ewc = EWCImportances(cfg)
        super().__init__(model=model, cfg=cfg, plugins=[*(plugins or []), self.ewc], **kwargs)

    def penalty(self) -> torch.Tensor:
        """The current value of ``sum_i F_i (p_i - p*_i)^2`` (0 in the first experience):
        the term the plugin adds to the loss, times ``ewc_lambda``."""
        counter = int(self.clock.train_exp_counter)
        if counter == 0:
            return torch.zeros(())
        if self.cfg.mode == "online":
            experiences = [counter - 1]
        else:
            experiences = list(range(counter))
        total = torch.zeros((), device=self.device)
        for e in experiences:
            for name, p in self.model.named_parameters():
                if name not in self.ewc.saved_params[e]:
                    continue
                saved = self.ewc.saved_params[e][name].expand(p.shape)
                imp = self.ewc.importances[e][name].expand(p.shape)
                total = total + (imp * (p - saved).pow(2)).sum()
        return total

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "ewc": ewc_state(self.ewc)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        load_ewc_state(self.ewc, state.pop("ewc"))
        super().load_extra_state(state)


# ------------------------------------------------------------------------ LwF
@dataclass
class LwFConfig(StrategyConfig):
    """mammoth's ``lwf`` on seq-cifar10 (SGD, no momentum, weight decay 5e-4), 5 epochs
    (the embedded default's; mammoth: 50)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 5.0e-4
    # distillation weight (mammoth --alpha)
    alpha: float = 3.0
    # softmax temperature of the distillation (mammoth --softmax_temp)
    temperature: float = 2.0
    # epochs of the head warm-up before each experience from the second (mammoth: n_epochs)
    warmup_epochs: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        check_positive("strategy.temperature", self.temperature)
        check_positive("strategy.warmup_epochs", self.warmup_epochs, allow_zero=True)


class TeacherLwF(LwFPlugin):
    """Avalanche's ``LwFPlugin`` whose teacher the strategy sets (the plugin's own copy
    after each experience is off)."""

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """The strategy makes the teacher at the start of the next experience."""


class LwF(CLStrategy):
    """Learning without Forgetting with Avalanche's LwFPlugin: the frozen previous model.

    ``CE + alpha KL`` distillation of the previous model's outputs on the earlier classes,
    after a warm-up of the new head units."""

    Config = LwFConfig
    cfg: LwFConfig
    #: the classes of the experiences before the current one (the distilled outputs)
    STATE = ("past_classes",)

    def __init__(
        self,
        *,
        model: ClassifierModel,
        cfg: LwFConfig,
        plugins: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.lwf_plugin = TeacherLwF(alpha=cfg.alpha, temperature=cfg.temperature)
        super().__init__(
            model=model, cfg=cfg, plugins=[*(plugins or []), self.lwf_plugin], **kwargs
        )
        self.past_classes: list[int] = []

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen previous model (None in the first experience)."""
        return self.lwf_plugin.lwf.prev_model

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        lwf = self.lwf_plugin.lwf
        lwf.prev_model = frozen_copy(self.model) if self.past_classes else None
        lwf.prev_classes_by_task = defaultdict(set, {0: set(self.past_classes)})
        self.warm_up_head()

    def warm_up_head(self) -> None:
        """mammoth's / the LwF paper's warm-up: ``warmup_epochs`` passes over the
        experience in which only the head trains (plain SGD at ``lr``) on the current
        classes' logits, the backbone frozen and the model in eval mode; the earlier
        classes' units get no gradient."""
        model = self.model
        if not self.past_classes or self.cfg.warmup_epochs == 0:
            return
        if not isinstance(model, ClassifierModel):
            return  # a text head (CLIP) has no unit of its own to warm up
        params = [p for p in model.head.parameters() if p.requires_grad]
        if not params:
            return
        optimizer = torch.optim.SGD(params, lr=self.cfg.lr)
        was_training = model.training
        model.eval()
        try:
            for _ in range(self.cfg.warmup_epochs):
                for batch in self.dataloader:
                    x, y = batch[0].to(self.device), batch[1].to(self.device)
                    with torch.no_grad():
                        feats = model.backbone(x)
                    logits = mask_logits(model.head(feats), self.current_classes)
                    optimizer.zero_grad()
                    F.cross_entropy(logits, y).backward()
                    optimizer.step()
        finally:
            model.train(was_training)

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.past_classes = sorted(set(self.past_classes) | set(self.current_classes))
        super()._after_training_exp(**kwargs)


# ---------------------------------------------------------------------- GDumb
@dataclass
class GDumbConfig(StrategyConfig):
    """GDumb's trainer (drimpossible/GDumb src/opts.py, src/main.py); 16 epochs over the
    memory per experience (the embedded default's; GDumb: 128 on MNIST, 256 on CIFAR)."""

    epochs: int = 16
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1.0e-6
    # samples in the class-balanced memory (GDumb --memory_size)
    mem_size: int = 500
    # true: GDumb's schedule (epoch 0 at lr / 10, then SGDR T_0 = 1, T_mult = 2 to min_lr)
    warm_restarts: bool = True
    # the schedule's floor (GDumb --minlr)
    min_lr: float = 5.0e-4
    # gradient norm clipping (GDumb --clip); 0: none
    clip_grad: float = 10.0
    # probability of CutMix per mini-batch (GDumb --cutmix_prob with --regularization cutmix)
    cutmix_prob: float = 0.0
    # CutMix's Beta(alpha, alpha) (GDumb --cutmix_alpha)
    cutmix_alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.mem_size", self.mem_size)
        check_positive("strategy.min_lr", self.min_lr, allow_zero=True)
        check_positive("strategy.clip_grad", self.clip_grad, allow_zero=True)
        check_range("strategy.cutmix_prob", self.cutmix_prob, 0.0, 1.0)
        check_positive("strategy.cutmix_alpha", self.cutmix_alpha)
        if self.warm_restarts and self.lr_schedule != "constant":
            raise ConfigError(
                f"invalid value for strategy.lr_schedule: {self.lr_schedule!r}; "
                "strategy.warm_restarts=true is GDumb's schedule: use "
                "strategy.lr_schedule=constant, or strategy.warm_restarts=false"
            )
        if self.warm_restarts and self.min_lr > self.lr:
            raise ConfigError(
                f"invalid value for strategy.min_lr: {self.min_lr!r}; the schedule's floor "
                f"must not exceed strategy.lr ({self.lr!r})"
            )


def sgdr_factor(epoch: int, min_ratio: float) -> float:
    """GDumb's learning-rate factor at ``epoch``: 0.1 at epoch 0, 1 at epoch 1, then
    ``CosineAnnealingWarmRestarts(T_0=1, T_mult=2, eta_min=min_ratio)`` stepped once per
    epoch (``epoch - 1`` steps)."""
    if epoch == 0:
        return 0.1
    t_cur, t_i = 0, 1
    for _ in range(epoch - 1):
        t_cur += 1
        if t_cur >= t_i:
            t_cur -= t_i
            t_i *= 2
    return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0


def cutmix(
    x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GDumb's ``cutmix_data``: a box of ``x`` pasted from a permutation of the batch;
    returns the mixed inputs, the pasted rows' labels and the kept area's share."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.as_tensor(rng.permutation(len(x)), device=x.device)
    w, h = x.shape[2], x.shape[3]
    cut = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(w * cut), int(h * cut)
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    x1, x2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    y1, y2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    mixed = x.clone()
    mixed[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
    kept = 1.0 - float((x2 - x1) * (y2 - y1)) / (w * h)
    return mixed, y[perm], kept


class GDumb(CLStrategy):
    """GDumb: a class-balanced memory, and the initial model retrained on it alone.

    At every experience the memory (Avalanche's ClassBalancedBuffer) takes the experience's
    samples, then the model restarts from its initial weights and trains on the memory only."""

    Config = GDumbConfig
    cfg: GDumbConfig
    #: the weights every experience restarts from
    STATE = ("_initial_state",)

    def __init__(self, *, model: ClassifierModel, cfg: GDumbConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.memory = SampleMemory("class_balanced", cfg.mem_size)
        self._initial_state = copy.deepcopy(dict(model.state_dict()))
        self._cutmix_rng: np.random.Generator | None = None
        self._mix: tuple[torch.Tensor, float] | None = None

    @property
    def storage_policy(self) -> Any:
        """Avalanche's ``ClassBalancedBuffer`` (GDumbPlugin's policy)."""
        return self.memory.storage

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        """The memory takes the experience (seeded), and is the training set."""
        exp_id = int(self.experience.current_experience)
        self.memory.restore(self.experience.origin_stream)
        seed = derived_generator(self.seed, exp_id, BUFFER_STREAM).initial_seed()
        self.memory.update(self.experience.dataset, exp_id, seed)
        self.adapted_dataset = self.memory.dataset.train()
        rng_seed = derived_generator(self.seed, exp_id, CUTMIX_STREAM).initial_seed()
        self._cutmix_rng = np.random.default_rng(rng_seed)

    def adapt_to_experience(self) -> None:
        """The initial weights, in place (the head's units drawn afresh for the classes
        seen); the memory holds every seen class, so the "current" classes are those."""
        self.current_classes = list(self.seen_classes)
        head_size = self.model.head.num_classes
        self.model.head.reset()
        self.model.load_state_dict(self._initial_state)
        self.model.head.grow(head_size)
        self.model.to(self.device)

    def _before_training_epoch(self, **kwargs: Any) -> None:
        if self.cfg.warm_restarts:
            epoch = int(self.clock.train_exp_epochs)
            self._set_lr(sgdr_factor(epoch, self.cfg.min_lr / self.cfg.lr))
        super()._before_training_epoch(**kwargs)

    def _before_forward(self, **kwargs: Any) -> None:
        self._mix = None
        cfg = self.cfg
        rng = self._cutmix_rng
        if (
            self.is_training
            and cfg.cutmix_prob > 0
            and rng is not None
            and rng.random() < cfg.cutmix_prob
        ):
            x, y_b, kept = cutmix(self.mb_x, self.mb_y, cfg.cutmix_alpha, rng)
            self.mbatch[0] = x
            self._mix = (y_b, kept)
        super()._before_forward(**kwargs)

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if not self.is_training or self._mix is None:
            return loss
        y_b, kept = self._mix
        cfg = self.cfg
        other = training_ce(
            self.mb_output, y_b, cfg.loss_mask, self.current_classes, cfg.label_smoothing
        )
        return kept * loss + (1.0 - kept) * other

    def optimizer_step(self) -> None:
        if self.cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.cfg.clip_grad)
        super().optimizer_step()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "memory": self.memory.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.memory.load_state(state.pop("memory"))
        super().load_extra_state(state)


# ---------------------------------------------------------------------- iCaRL
@dataclass
class ICaRLConfig(StrategyConfig):
    """mammoth's ``icarl`` on seq-cifar10 with a 500-sample memory (SGD, no momentum), 5
    epochs (the embedded default's; mammoth: 50)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    # iCaRL's loss + 1e-5 sum p^2 (mammoth --opt_wd; iCaRL's wght_decay): SGD decay 2e-5
    weight_decay: float = 2.0e-5
    # exemplars in memory: mem_size // seen classes per class (mammoth --buffer_size)
    mem_size: int = 500
    # one head over all the scenario's classes from the first experience (mammoth, iCaRL)
    full_head: bool = True
    # class means also from the horizontally flipped exemplars (iCaRL's and mammoth's code)
    flip_means: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.mem_size", self.mem_size)
        if self.loss_mask != "seen":
            raise ConfigError(
                f"invalid value for strategy.loss_mask: {self.loss_mask!r}; iCaRL's loss is "
                "a sigmoid BCE over every output: use strategy.loss_mask=seen"
            )
        if self.label_smoothing != 0:
            raise ConfigError(
                f"invalid value for strategy.label_smoothing: {self.label_smoothing!r}; "
                "iCaRL's loss is a sigmoid BCE, not smoothed: use strategy.label_smoothing=0"
            )


class TeacherICaRLLoss(ICaRLLossPlugin):
    """Avalanche's ``ICaRLLossPlugin`` whose old model and old classes the strategy sets
    (the plugin's own copy after each experience is off)."""

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        """The strategy makes the old model at the start of the next experience."""


class NormalisedHerding(HerdingSelectionStrategy):
    """Avalanche's herding on L2-normalised features the caller computes (no layer hook)."""

    def __init__(self) -> None:  # features come from the strategy, not a hooked layer
        pass

    def order(self, features: torch.Tensor) -> list[int]:
        """Every sample, in herding order (iCaRL's Algorithm 4), of ``features`` (N, D)."""
        return [int(i) for i in self.make_sorted_indices_from_features(F.normalize(features))]


class ICaRL(CLStrategy):
    """iCaRL: herding exemplars, distillation BCE, nearest-mean-of-exemplars prediction.

    BCE with the previous model's outputs as old-class targets (Avalanche's ICaRLLossPlugin),
    exemplars chosen by herding and trained with each experience, prediction by the nearest
    mean of exemplars (Avalanche's NCMClassifier)."""

    Config = ICaRLConfig
    cfg: ICaRLConfig
    #: the classes of the experiences before the current one
    STATE = ("past_classes",)

    def __init__(
        self,
        *,
        model: ClassifierModel,
        cfg: ICaRLConfig,
        plugins: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.icarl_loss = TeacherICaRLLoss()
        super().__init__(
            model=model, cfg=cfg, plugins=[*(plugins or []), self.icarl_loss], **kwargs
        )
        self.past_classes: list[int] = []
        #: per class, its exemplars' references (experience, index) in herding order
        self.exemplars: dict[int, torch.Tensor] = {}
        self.ncm = NCMClassifier(normalize=True)
        self.herding = NormalisedHerding()

    def prepare_model(self, model: ClassifierModel) -> None:
        if not isinstance(model, ClassifierModel):
            raise ConfigError(
                f"strategy icarl needs a backbone with a linear head (its class means are "
                f"means of the backbone's features); got a {type(model).__name__}: use a "
                "ViT or WideResNet backbone"
            )

    # ------------------------------------------------------------------ head
    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        """With ``full_head``, the head grows to every class of the scenario (1 + the
        largest class id over the train stream) at the first experience."""
        target = self.model if model is None else model
        if self.is_training and self.cfg.full_head:
            stream = self.experience.origin_stream
            n = 1 + max(int(c) for e in stream for c in e.classes_in_this_experience)
            target.head.grow(n)  # type: ignore[operator]
        return super().model_adaptation(target)

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        loss = self.icarl_loss
        loss.old_model = frozen_copy(self.model) if self.past_classes else None
        loss.old_classes = list(self.past_classes)
        loss.old_logits = None

    # ------------------------------------------------------------ exemplars
    def memory_per_class(self) -> int:
        """Exemplars per seen class: ``mem_size // seen classes`` (mammoth)."""
        return self.cfg.mem_size // max(len(self.seen_classes), 1)

    def exemplar_dataset(self, stream: Any) -> Any:
        """Every exemplar, as one dataset of the train stream's samples (None if none)."""
        parts = []
        for c in sorted(self.exemplars):
            for e, i in self.exemplars[c].tolist():
                parts.append((e, i))
        if not parts:
            return None
        by_exp: dict[int, list[int]] = defaultdict(list)
        for e, i in parts:
            by_exp[e].append(i)
        data = None
        for e in sorted(by_exp):
            subset = stream[e].dataset.subset(by_exp[e])
            data = subset if data is None else data.concat(subset)
        return data

    def train_dataset_adaptation(self, **kwargs: Any) -> None:
        """The experience's training set with every exemplar added (iCaRL's training set)."""
        super().train_dataset_adaptation(**kwargs)
        memory = self.exemplar_dataset(self.experience.origin_stream)
        if memory is not None:
            self.adapted_dataset = self.adapted_dataset.concat(memory.train())

    @torch.no_grad()
    def features(self, dataset: Any, flip: bool = False) -> torch.Tensor:
        """Backbone features (N, D) of ``dataset`` in eval mode (inputs flipped
        horizontally if ``flip``), on the CPU."""
        model = self.model
        was_training = model.training
        model.eval()
        n, bs = len(dataset), self.eval_mb_size
        chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        if self.in_memory:
            x_all = materialise(dataset)[0]
            batches = (x_all[c[0] : c[-1] + 1] for c in chunks)
        else:
            workers = int(getattr(self.experience, "loader_workers", 0))  # the scenario's
            batches = (b[0] for b in read_batches(dataset, chunks, workers))
        out = []
        try:
            for x in batches:
                x = x.to(self.device)
                if flip:
                    x = torch.flip(x, [x.dim() - 1])
                out.append(model.backbone(x).float().cpu())  # type: ignore[operator]
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 0)

    def select_exemplars(self) -> None:
        """Herding over each new class's samples (every sample ranked), then every class
        cut to :meth:`memory_per_class`."""
        exp_id = int(self.experience.current_experience)
        dataset = self.experience.dataset.eval()
        targets = torch.as_tensor([int(t) for t in dataset.targets])
        keep = self.memory_per_class()
        for c in self.current_classes:
            rows = torch.nonzero(targets == c).flatten().tolist()
            if not rows:
                continue
            order = self.herding.order(self.features(dataset.subset(rows)))
            refs = [[exp_id, rows[j]] for j in order[:keep]]
            self.exemplars[c] = torch.tensor(refs, dtype=torch.long)
        for c in list(self.exemplars):
            self.exemplars[c] = self.exemplars[c][:keep]

    def compute_class_means(self) -> None:
        """Each class's mean of normalised exemplar features (averaged with the flipped
        exemplars' if ``flip_means``), normalised, into the NCM classifier."""
        stream = self.experience.origin_stream
        means: dict[int, torch.Tensor] = {}
        for c in sorted(self.exemplars):
            refs = self.exemplars[c].tolist()
            if not refs:
                continue
            by_exp: dict[int, list[int]] = defaultdict(list)
            for e, i in refs:
                by_exp[e].append(i)
            data = None
            for e in sorted(by_exp):
                subset = stream[e].dataset.eval().subset(by_exp[e])
                data = subset if data is None else data.concat(subset)
            mean = F.normalize(self.features(data)).mean(0)
            if self.cfg.flip_means:
                flipped = F.normalize(self.features(data, flip=True)).mean(0)
                mean = (mean + flipped) / 2
            means[c] = F.normalize(mean, dim=0)
        self.ncm.replace_class_means_dict(means)

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.select_exemplars()
        self.compute_class_means()
        self.past_classes = sorted(set(self.past_classes) | set(self.current_classes))
        super()._after_training_exp(**kwargs)

    # ---------------------------------------------------------- prediction
    def class_mean_scores(self, x: torch.Tensor) -> torch.Tensor:
        """``-|| f(x) / |f(x)| - mu_c ||`` per class with a mean (Avalanche's
        NCMClassifier); -inf for a class id without one."""
        scores = self.ncm(self.model.backbone(x))  # type: ignore[operator]
        return mask_logits(scores, sorted(self.ncm.class_means_dict))

    def forward(self) -> torch.Tensor:
        """Training: the head's logits; evaluation: the nearest mean of exemplars."""
        if self.is_training or not self.ncm.class_means_dict:
            return super().forward()
        return self.class_mean_scores(self.mb_x)

    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return super().criterion()
        return self.icarl_loss(self.mb_output, self.mb_y)

    def num_inference_parameters(self) -> int:
        """The backbone and the class means (the head is not used to predict)."""
        means = self.ncm.class_means
        n_means = 0 if means is None else int(means.numel())
        return sum(p.numel() for p in self.model.backbone.parameters()) + n_means

    # ------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        classes = sorted(self.ncm.class_means_dict)
        means = (
            torch.stack([self.ncm.class_means_dict[c].cpu() for c in classes])
            if classes
            else torch.zeros(0, 0)
        )
        return {
            **super().extra_state(),
            "exemplars": {str(c): refs for c, refs in self.exemplars.items()},
            "mean_classes": classes,
            "class_means": means,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.exemplars = {int(c): r.long() for c, r in state.pop("exemplars").items()}
        classes = [int(c) for c in state.pop("mean_classes")]
        means = state.pop("class_means")
        self.ncm = NCMClassifier(normalize=True)
        if classes:
            self.ncm.replace_class_means_dict({c: means[k].float() for k, c in enumerate(classes)})
        super().load_extra_state(state)
