"""Continual test-time adaptation: Source, BN-adapt, Tent, CoTTA, EATA, PSMT, EcoTTA.

Test-time strategies follow a small interface (Avalanche has no test-time template):
``setup(source)`` once before the stream, ``adapt(x)`` returns the prediction for a test
batch and learns from it (``steps`` times ``adapt_step``, returning the last step's output,
as the official codes loop ``forward_and_adapt``), ``predict(x)`` predicts without learning,
``reset()`` returns to the exact source state (weights, teacher, optimizer and method
state). They work on a :class:`~clbench.models.ClassifierModel` whose head already
classifies (the source model).
Defaults are the official code's (docs/methods.md); each YAML in conf/strategy/ names its source.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from clbench.strategies.learner import Learner
from clbench.strategies.learner import make_optimizer as make_optimizer  # re-exported
from torch import nn
from torch.utils.data import Dataset

from clbench.adapters.tta import (
    MetaPart,
    Snapshot,
    attach_meta_parts,
    cotta_augment,
    ema_update_,
    entropy_margin,
    fisher_diagonal,
    make_frozen_layers_lean,
    norm_affine_parameters,
    seeded_subset,
    soft_cross_entropy,
    softmax_entropy,
    stochastic_restore_,
    train_only,
    use_batch_statistics,
    weight_bias_parameters,
)
from clbench.backbones.wideresnet import WideResNet
from clbench.checks import check_choice, check_positive, check_range
from clbench.data import TensorBatches, materialise
from clbench.errors import ClbenchError
from clbench.precision import to_float32

if TYPE_CHECKING:
    from clbench.protocols.tta import DomainStream

OPTIMIZERS = ("adam", "sgd")
FLIPS = ("auto", "true", "false")


@dataclass
class TTAConfig:
    """Options every test-time strategy has (schema of conf/strategy/NAME.yaml)."""

    name: str = "???"


@dataclass
class OptimizedConfig(TTAConfig):
    """Options of the strategies that take gradient steps at test time."""

    optimizer: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9  # Adam's first beta (the second is 0.999)
    momentum: float = 0.9  # SGD
    weight_decay: float = 0.0
    steps: int = 1  # adapt steps (forward + update) per test batch; the last one predicts

    def __post_init__(self) -> None:
        check_choice("strategy.optimizer", self.optimizer, OPTIMIZERS)
        check_positive("strategy.lr", self.lr)
        check_range("strategy.beta1", self.beta1, 0.0, 1.0)
        check_range("strategy.momentum", self.momentum, 0.0, 1.0)
        check_positive("strategy.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("strategy.steps", self.steps)


def _source_batches(
    source: Dataset, batch_size: int, limit: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``limit`` source samples drawn at random (``generator``), in batches in drawn order:
    the official codes' random subset read through a shuffled loader."""
    x = materialise(source)[0]
    x = x[seeded_subset(len(x), limit, generator)]
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


class TTAStrategy(Learner):
    """Base: the source model, unchanged (subclasses adapt)."""

    Config: ClassVar[type[TTAConfig]] = TTAConfig
    kind: ClassVar[str] = "test_time"

    def __init__(
        self,
        *,
        model: nn.Module,
        cfg: TTAConfig,
        seed: int = 0,
        device: torch.device | str = "cpu",
        stream: DomainStream | None = None,
    ) -> None:
        from clbench.protocols.tta import DomainStream  # the protocol imports this module

        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device)
        #: the scenario's protocol inputs (batch size, value range, flips); defaults if None
        self.stream = stream if stream is not None else DomainStream(domains=())
        self.batch_size = self.stream.batch_size
        self.setup_seconds = 0.0  # measured by the protocol around setup()
        self.num_classes = int(model.head.num_classes)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        #: adapt steps per test batch (strategies without the option: 1)
        self.steps = int(getattr(cfg, "steps", 1))
        self.optimizer: torch.optim.Optimizer | None = None
        self._snapshot: Snapshot | None = None
        self.counts: dict[str, float] = {}  # what the method did, summed over the stream
        self.configure()

    # -- what subclasses override
    def configure(self) -> None:
        """Set normalisation modes, trainable parameters, optimizer, extra models."""
        self.model.eval()
        self.model.requires_grad_(False)

    def stateful(self) -> dict[str, nn.Module]:
        """The modules a reset restores."""
        return {"model": self.model}

    def reset_state(self) -> None:
        """Method state besides weights and optimizer (e.g. EATA's moving probabilities)."""

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction (logits) for a test batch; adapting strategies learn from it.

        Runs :meth:`adapt_step` ``steps`` times on the batch and returns the last step's
        output, as the official codes' ``for _ in range(steps): outputs =
        forward_and_adapt(x)``.
        """
        logits = self.adapt_step(x)
        for _ in range(self.steps - 1):
            logits = self.adapt_step(x)
        return logits

    @torch.no_grad()
    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        """One forward (and update, for adapting strategies); returns its prediction."""
        return self.forward_pass(self.model, x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The current prediction without learning anything."""
        return self.forward_pass(self.model, x)

    # -- shared
    def forward_pass(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` in the run's precision (:meth:`autocast`), its output float32: the
        methods' losses, selections and statistics are computed in float32."""
        with self.autocast():
            return to_float32(module(x))

    def update(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` then ``optimizer.step()`` in the run's precision (fp16: the
        loss scaled, the gradients unscaled before the step)."""
        self.precision.backward(loss, self.optimizer)
        self.precision.step(self.optimizer)

    def count(self, **values: float) -> None:
        for k, v in values.items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)

    def stats(self) -> dict[str, float]:
        """Method statistics over the stream so far (e.g. the fraction of samples used)."""
        c = self.counts
        out = {}
        for k, v in c.items():
            if k.endswith("_samples") and c.get("samples"):
                out[k.removesuffix("_samples") + "_fraction"] = v / c["samples"]
            elif k.endswith("_batches") and c.get("batches"):
                out[k.removesuffix("_batches") + "_batch_fraction"] = v / c["batches"]
            elif k.endswith("_sum") and c.get("batches"):
                out[k.removesuffix("_sum") + "_mean"] = v / c["batches"]
        return out

    def setup(self, source: Dataset | None) -> None:
        """Once before the stream: method preparation on source data, then the snapshot."""
        self._snapshot = Snapshot(
            self.stateful(), {"optimizer": self.optimizer} if self.optimizer else {}
        )

    def reset(self) -> None:
        """Back to the exact state after :meth:`setup` (the source)."""
        if self._snapshot is None:
            raise RuntimeError("call setup() before the stream")
        self._snapshot.restore()
        self.precision.reset()  # fp16: the loss scale restarts too
        self.reset_state()

    def modules(self) -> list[nn.Module]:
        """Every network the strategy holds (memory accounting)."""
        return list(self.stateful().values())

    def state_tensors(self) -> list[Any]:
        """Other tensors it holds: optimizer state, source copies, Fisher."""
        return [self.optimizer] if self.optimizer is not None else []


class Source(TTAStrategy):
    """No adaptation: the source model with its training-time normalisation statistics."""


class BNAdapt(TTAStrategy):
    """BatchNorm with test-batch statistics, no gradient (Schneider et al. 2020)."""

    def configure(self) -> None:
        super().configure()
        if use_batch_statistics(self.model) == 0:
            print(
                "warning: bn_adapt: the model has no BatchNorm layer (LayerNorm has no "
                "statistics to re-estimate); its predictions are the source model's",
                file=sys.stderr,
            )


@dataclass
class TentConfig(OptimizedConfig):
    name: str = "tent"


class NormAffine(TTAStrategy):
    """Base of Tent and EATA: BN on batch statistics, only normalisation affines train."""

    def configure(self) -> None:
        use_batch_statistics(self.model)
        self.model.train()
        self.norm_params = norm_affine_parameters(self.model)
        train_only(self.model, self.norm_params.values())
        self.optimizer = self.build_optimizer(list(self.norm_params.values()))


class Tent(NormAffine):
    """Entropy minimisation over the normalisation affine parameters (Wang et al. 2021)."""

    Config = TentConfig

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_pass(self.model, x)
        loss = softmax_entropy(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.update(loss)
        return logits.detach()  # this step's forward, before its update


@dataclass
class CoTTAConfig(OptimizedConfig):
    name: str = "cotta"
    ema: float = 0.999  # teacher momentum
    restore_p: float = 0.01  # stochastic restore probability (CIFAR; ImageNet 0.001)
    # the anchor's mean max-softmax below which the teacher averages augmented passes
    # (CIFAR-10 0.92, CIFAR-100 0.72, ImageNet 0.1)
    anchor_threshold: float = 0.92
    n_augmentations: int = 32
    # horizontal flips in the augmentation: auto = only where the scenario says a flip
    # keeps the label (CIFAR, ImageNet yes; digits no). The official code always flips.
    flip: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("strategy.ema", self.ema, 0.0, 1.0)
        check_range("strategy.restore_p", self.restore_p, 0.0, 1.0)
        check_range("strategy.anchor_threshold", self.anchor_threshold, 0.0, 1.0)
        check_positive("strategy.n_augmentations", self.n_augmentations)
        check_choice("strategy.flip", str(self.flip).lower(), FLIPS)


class MeanTeacher(TTAStrategy):
    """A student trained on every weight and bias, an EMA teacher, the frozen source weights.

    The trained (and restored) set is the official codes' ``collect_params``: every
    module's own ``weight`` and ``bias``. Other parameters (a ViT's ``cls_token``,
    ``pos_embed``, register tokens) are not in their optimizer, so they keep their source
    values: here they are frozen.
    """

    def configure(self) -> None:
        use_batch_statistics(self.model)
        self.model.train()
        self.params = weight_bias_parameters(self.model)
        train_only(self.model, self.params.values())
        self.source_params = {n: p.detach().clone() for n, p in self.params.items()}
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = self.build_optimizer(list(self.params.values()))

    def stateful(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def state_tensors(self) -> list[Any]:
        return [*super().state_tensors(), self.source_params]


class CoTTA(MeanTeacher):
    """Mean teacher with anchor-gated augmentation averaging and stochastic restore (CoTTA)."""

    Config = CoTTAConfig

    def configure(self) -> None:
        super().configure()
        self.anchor = copy.deepcopy(self.teacher)
        flip = str(self.cfg.flip).lower()
        self.flip = flip == "true" or (flip == "auto" and self.stream.flip_preserves_label)
        self.value_range = tuple(self.stream.value_range)
        self.last_augmented = False
        self.last_restored = 0.0

    def stateful(self) -> dict[str, nn.Module]:
        return {**super().stateful(), "anchor": self.anchor}

    @torch.no_grad()
    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits: averaged over augmentations iff the anchor is unsure."""
        confidence = self.forward_pass(self.anchor, x).softmax(1).max(1).values.mean()
        self.last_augmented = bool(confidence < self.cfg.anchor_threshold)
        if not self.last_augmented:
            return self.forward_pass(self.teacher, x)
        self.count(augmented_batches=1)
        views = [
            self.forward_pass(
                self.teacher, cotta_augment(x, self.generator, self.value_range, self.flip)
            )
            for _ in range(self.cfg.n_augmentations)
        ]
        return torch.stack(views).mean(0)

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_pass(self.model, x)
        target = self.teacher_output(x)
        loss = soft_cross_entropy(logits, target).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.update(loss)
        ema_update_(self.teacher, self.model, self.cfg.ema)
        if self.cfg.restore_p > 0:
            self.last_restored = stochastic_restore_(
                self.params, self.source_params, self.cfg.restore_p, self.generator
            )
        self.count(batches=1, restored_sum=self.last_restored)
        return target

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pass(self.teacher, x)


@dataclass
class EATAConfig(OptimizedConfig):
    name: str = "eata"
    optimizer: str = "sgd"
    lr: float = 2.5e-4
    e_margin: float = 0.4  # reliable: entropy < e_margin * ln C
    d_margin: float = 0.05  # non-redundant: |cos(p, moving average p)| < d_margin
    prob_momentum: float = 0.9  # of the moving average of kept predictions
    fisher_alpha: float = 2000.0  # beta of the Fisher penalty (0: none)
    fisher_size: int = 2000  # clean samples for the Fisher

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.e_margin", self.e_margin)
        check_range("strategy.d_margin", self.d_margin, 0.0, 1.0)
        check_range("strategy.prob_momentum", self.prob_momentum, 0.0, 1.0)
        check_positive("strategy.fisher_alpha", self.fisher_alpha, allow_zero=True)
        check_positive("strategy.fisher_size", self.fisher_size)


class FisherAnchored(TTAStrategy):
    """Shared by EATA and PSMT: a diagonal Fisher on clean samples and its penalty."""

    fisher: dict[str, torch.Tensor]

    def compute_fisher(self, source: Dataset | None, params: dict[str, nn.Parameter]) -> None:
        self.anchor_params = {n: p.detach().clone() for n, p in params.items()}
        self.fisher_params = params
        self.fisher = {}
        if self.cfg.fisher_alpha == 0:
            return
        if source is None:
            raise ClbenchError(
                f"{self.cfg.name} computes its Fisher on clean source samples and the scenario "
                "has none; set strategy.fisher_alpha=0 to run without the penalty"
            )
        # a random subset in random order, seeded by the run's seed (not the shared generator)
        generator = torch.Generator().manual_seed(self.seed)
        batches = _source_batches(source, self.batch_size, self.cfg.fisher_size, generator)
        self.fisher = fisher_diagonal(
            self.model, (b.to(self.device) for b in batches), self.fisher_params
        )

    def fisher_penalty(self) -> torch.Tensor:
        """``alpha * sum F (theta - theta_source)^2`` (zero at the source weights)."""
        total = torch.zeros((), device=self.device)
        for name, f in self.fisher.items():
            diff = self.fisher_params[name] - self.anchor_params[name]
            total = total + (f * diff**2).sum()
        return self.cfg.fisher_alpha * total

    def state_tensors(self) -> list[Any]:
        return [*super().state_tensors(), self.fisher, self.anchor_params]


class EATA(FisherAnchored, NormAffine):
    """Entropy minimisation on reliable, non-redundant samples with a Fisher anchor (EATA)."""

    Config = EATAConfig

    def configure(self) -> None:
        super().configure()
        self.e0 = entropy_margin(self.num_classes, self.cfg.e_margin)
        self.reset_state()

    def setup(self, source: Dataset | None) -> None:
        self.compute_fisher(source, self.norm_params)
        super().setup(source)

    def reset_state(self) -> None:
        self.probs_ema: torch.Tensor | None = None
        self.last_reliable = 0
        self.last_selected = 0

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Indices of the reliable (low entropy) and non-redundant samples; updates the EMA."""
        entropy = softmax_entropy(logits)
        reliable = torch.nonzero(entropy < self.e0).flatten()
        probs = logits[reliable].softmax(1).detach()
        keep = reliable
        if self.probs_ema is not None and len(reliable):
            cos = nn.functional.cosine_similarity(self.probs_ema.unsqueeze(0), probs, dim=1)
            novel = torch.abs(cos) < self.cfg.d_margin
            keep, probs = reliable[novel], probs[novel]
        if len(probs):
            mean = probs.mean(0)
            m = self.cfg.prob_momentum
            self.probs_ema = mean if self.probs_ema is None else m * self.probs_ema + (1 - m) * mean
        self.last_reliable, self.last_selected = len(reliable), len(keep)
        self.count(samples=len(logits), reliable_samples=len(reliable), selected_samples=len(keep))
        return keep

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_pass(self.model, x)
        keep = self.select(logits)
        if len(keep):
            entropy = softmax_entropy(logits[keep])
            weights = torch.exp(-(entropy.detach() - self.e0))  # 1 / exp(H - E0)
            loss = (entropy * weights).mean()
            if self.fisher:
                loss = loss + self.fisher_penalty()
            self.optimizer.zero_grad(set_to_none=True)
            self.update(loss)
        return logits.detach()


@dataclass
class PSMTConfig(OptimizedConfig):
    name: str = "psmt"
    ema: float = 0.999  # teacher momentum over the selected elements
    fisher_alpha: float = 500.0  # weight of the Fisher penalty towards the source
    fisher_size: int = 10000  # clean source samples for the Fisher (computed once)
    quantile: float = 0.03  # elements with squared gradient below this quantile: restored

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("strategy.ema", self.ema, 0.0, 1.0)
        check_positive("strategy.fisher_alpha", self.fisher_alpha, allow_zero=True)
        check_positive("strategy.fisher_size", self.fisher_size)
        check_range("strategy.quantile", self.quantile, 0.0, 1.0)


class PSMT(FisherAnchored, MeanTeacher):
    """Parameter-selective mean teacher (Tian & Lyu, ACCV 2024).

    The student learns the symmetric cross-entropy to the teacher plus a Fisher penalty
    towards the source; after each step the elements whose squared gradient is below the
    ``quantile`` of all elements are restored to their source values and the teacher
    takes the EMA of the other (selected) elements. Prediction: teacher + student logits.
    The official code averages 32 teacher passes gated by an anchor like CoTTA, but on the
    un-augmented batch, so they equal one pass: we run one. It then sets the teacher's
    restored elements to the source value and applies the EMA a second time to the
    others; we follow the paper (EMA once, over the selected elements only).
    """

    Config = PSMTConfig

    def setup(self, source: Dataset | None) -> None:
        self.compute_fisher(source, self.params)
        super().setup(source)

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_pass(self.model, x)
        with torch.no_grad():
            target = self.forward_pass(self.teacher, x)
        sce = 0.5 * soft_cross_entropy(logits, target) + 0.5 * soft_cross_entropy(target, logits)
        loss = sce.mean() + (self.fisher_penalty() if self.fisher else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, self.optimizer)  # fp16: the gradients come unscaled
        grads = {n: p.grad.detach() ** 2 for n, p in self.params.items() if p.grad is not None}
        flat = torch.cat([g.flatten() for g in grads.values()])
        k = max(1, int(self.cfg.quantile * flat.numel()))
        threshold = flat.kthvalue(k).values
        self.precision.step(self.optimizer)
        with torch.no_grad():
            m = self.cfg.ema
            restored = 0
            teacher = dict(self.teacher.named_parameters())
            for name, p in self.params.items():
                t = teacher[name]
                low = grads[name] < threshold if name in grads else torch.zeros_like(p, dtype=bool)
                p.copy_(torch.where(low, self.source_params[name], p))
                t.copy_(torch.where(low, t, m * t + (1 - m) * p))
                restored += int(low.sum())
            self.last_restored = restored / flat.numel()
        self.count(batches=1, restored_sum=self.last_restored)
        return target + logits.detach()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pass(self.teacher, x) + self.forward_pass(self.model, x)


# ------------------------------------------------------------------------- EcoTTA
@dataclass
class EcoTTAConfig(OptimizedConfig):
    name: str = "ecotta"
    # test time: SGD 5e-3, momentum 0.9 (the WRN-28 reimplementation of the authors'
    # sample code; the official code is not public)
    optimizer: str = "sgd"
    lr: float = 5e-3
    e_margin: float = 0.4  # entropy filter: keep H < e_margin * ln C
    reg_weight: float = 0.5  # lambda of the self-distilled regulariser (paper)
    # which WRN stages are cut in two halves: [true, true, false] = K=5 partitions,
    # [2,2,2,2,4] blocks on WRN-28 (the paper's default); [true, false, false] = K=4
    split_stages: list[bool] = field(default_factory=lambda: [True, True, False])
    # warm-up of the meta networks on source data: CE, SGD 5e-2 momentum 0.9, batch 64,
    # 10 epochs, lr x0.2 at epochs 3, 6, 8 after a one-epoch linear warm-up (sample code).
    # The sample code's colour/blur/greyscale augmentations are not applied.
    warmup_epochs: int = 10
    warmup_lr: float = 5e-2
    warmup_batch_size: int = 64
    # the frozen encoder's BatchNorm at test time: "source" = its source statistics (the
    # encoder is frozen; the meta networks' BN adapt; the authors' sample code and the
    # paper's memory accounting) or "batch" = test-batch statistics (the latest WRN-28
    # reimplementation). With "source" the frozen layers keep nothing for backward.
    frozen_bn: str = "source"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.e_margin", self.e_margin)
        check_positive("strategy.reg_weight", self.reg_weight, allow_zero=True)
        check_positive("strategy.warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_positive("strategy.warmup_lr", self.warmup_lr)
        check_positive("strategy.warmup_batch_size", self.warmup_batch_size)
        check_choice("strategy.frozen_bn", self.frozen_bn, ("source", "batch"))
        if len(self.split_stages) != 3:
            raise ClbenchError(
                f"invalid value for strategy.split_stages: {list(self.split_stages)}; "
                "give 3 booleans (one per WideResNet stage)"
            )


class EcoTTA(TTAStrategy):
    """Frozen encoder + light meta networks, filtered entropy + self-distillation (EcoTTA)."""

    Config = EcoTTAConfig

    def configure(self) -> None:
        backbone = getattr(self.model, "backbone", None)
        if not isinstance(backbone, WideResNet):
            raise ClbenchError(
                "ecotta attaches convolutional meta networks to a WideResNet's stages; the "
                f"backbone is {type(backbone).__name__}; use backbone=wrn_16_2 or wrn_28_10"
            )
        self.model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=self.generator)))
            self.parts: list[MetaPart] = attach_meta_parts(backbone, list(self.cfg.split_stages))
        self.model.to(self.device)
        self.meta_params = [p for part in self.parts for p in part.meta_parameters()]
        train_only(self.model, self.meta_params)
        self.e0 = entropy_margin(self.num_classes, self.cfg.e_margin)

    def setup(self, source: Dataset | None) -> None:
        if self.cfg.warmup_epochs:
            if source is None:
                raise ClbenchError(
                    "ecotta warms its meta networks up on source data and the scenario has "
                    "none; set strategy.warmup_epochs=0 to skip the warm-up"
                )
            self.warm_up(source)
        self.model.eval()
        for part in self.parts:  # the meta networks normalise with the test batch
            use_batch_statistics(nn.ModuleList([part.meta_bn, part.conv_block]))
        if self.cfg.frozen_bn == "batch":
            use_batch_statistics(self.model)
        make_frozen_layers_lean(self.model)
        self.optimizer = self.build_optimizer(self.meta_params)
        super().setup(source)

    def warm_up(self, source: Dataset) -> None:
        """Train only the meta networks with cross-entropy on the labelled source data."""
        x, y = materialise(source)[:2]
        batches = TensorBatches(
            [x, y], self.cfg.warmup_batch_size, shuffle=True, generator=self.generator
        )
        opt = torch.optim.SGD(self.meta_params, lr=self.cfg.warmup_lr, momentum=0.9)
        per_epoch = len(batches)

        def factor(step: int) -> float:
            epoch = step / per_epoch
            warm = min(1.0, (step + 1) / per_epoch)
            return warm * 0.2 ** sum(epoch >= m for m in (3, 6, 8))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        self.model.train()
        for _ in range(self.cfg.warmup_epochs):
            for xb, yb in batches:
                loss = nn.functional.cross_entropy(
                    self.model(xb.to(self.device)), yb.to(self.device)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()

    def regulariser(self) -> torch.Tensor:
        """Sum over partitions of the mean L1 between meta output and frozen output."""
        return sum(
            (out.float() - frozen.float()).abs().mean()
            for out, frozen in (p.last for p in self.parts)
        )

    def adapt_step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_pass(self.model, x)
        entropy = softmax_entropy(logits)
        kept = entropy[entropy < self.e0]
        self.count(samples=len(entropy), entropy_kept_samples=len(kept))
        loss = self.cfg.reg_weight * self.regulariser()
        if len(kept):
            loss = loss + kept.mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.update(loss)
        return logits.detach()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.meta_params
