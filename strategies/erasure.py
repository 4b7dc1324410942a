"""The learner contract of the continual-forgetting kind: :class:`ErasureStrategy`.

An erasure strategy is an Avalanche ``SupervisedTemplate`` (a :class:`CLStrategy`) on a
classifier that already knows every class (the head never grows). Before each
experience the protocol sets :attr:`ErasureStrategy.request` (which classes to forget,
keep, and which were forgotten earlier); the experience's dataset holds the request's
training samples of the retained and the forgotten classes (true labels). How the
mini-batches are formed is the strategy's ``data_mode``:

- ``paired`` (GS-LoRA's loop): an epoch is one pass over the retained samples; each
  mini-batch is a retained batch followed by a forget batch of the same size (the forget
  data cycled, reshuffled whenever it runs out). :attr:`forget_mask` marks the forget
  rows of the current mini-batch; :meth:`retain_part` / :meth:`forget_part` split it.
- ``remain``: the retained samples only (fine-tuning or retraining on retained data).
- ``relabel`` (the GS-LoRA code's continual-learning baselines): the forget samples with
  their labels moved to another class (drawn anew at every pass), mixed with the retained
  samples.

Prediction for scoring is :meth:`predict` (default: the model's logits in eval mode).
The classic baselines adapted to erasure requests live here too; GS-LoRA / GS-LoRA++
in :mod:`clbench.strategies.gs_lora`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.training import LearningWithoutForgetting
from clbench.strategies.base import CLStrategy, StrategyConfig
from torch import nn
from torch.optim.swa_utils import AveragedModel

from clbench.checks import check_choice, check_positive, check_range
from clbench.data import materialise, read_batches
from clbench.models import ClassifierModel
from clbench.precision import to_float32
from clbench.seeding import derived_generator

DATA_MODES = ("paired", "remain", "relabel")


@dataclass(frozen=True)
class ErasureRequest:
    """One erasure request: the classes to forget now, to keep, and forgotten earlier.

    ``missing`` (a subset of ``remain``): retained classes with no training data
    (GS-LoRA++'s missing-class setting).
    """

    forget: tuple[int, ...]
    remain: tuple[int, ...]
    old: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, list[int]]:
        return {
            "forget": list(self.forget),
            "remain": list(self.remain),
            "old": list(self.old),
            "missing": list(self.missing),
        }


@dataclass
class ErasureConfig(StrategyConfig):
    # the head keeps its trained weights (GS-LoRA and the official baselines freeze it)
    freeze_head: bool = True


class ErasureStrategy(CLStrategy):
    """Base of every continual-forgetting strategy (see the module docstring)."""

    Config: ClassVar[type[StrategyConfig]] = ErasureConfig
    cfg: ErasureConfig
    kind: ClassVar[str] = "forgetting"
    #: how mini-batches are formed (``paired``, ``remain`` or ``relabel``)
    data_mode: ClassVar[str] = "remain"
    #: processes reading a lazy experience's samples (the protocol sets it from the scenario)
    loader_workers: int = 0

    def __init__(self, *, model: ClassifierModel, cfg: ErasureConfig, **kwargs: Any) -> None:
        check_choice("data_mode", self.data_mode, DATA_MODES)
        self.request: ErasureRequest | None = None
        super().__init__(model=model, cfg=cfg, **kwargs)
        if cfg.freeze_head:
            model.head.requires_grad_(False)
        self.forget_mask = torch.zeros(0, dtype=torch.bool)

    # ------------------------------------------------------------------ data
    def _split(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(x, y) of the retained and of the forgotten classes of the current request."""
        if self.request is None:
            raise RuntimeError("no erasure request set: the protocol sets strategy.request")
        forget = torch.isin(y, torch.tensor(self.request.forget, dtype=y.dtype))
        return [x[~forget], y[~forget]], [x[forget], y[forget]]

    def split_experience(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The current experience's (x, y) of the retained and of the forgotten classes."""
        return self._split(*materialise(self.adapted_dataset)[:2])

    def split_indices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """As :meth:`split_experience` without reading a sample (lazy experiences): the
        (indices into the experience's dataset, labels) of the retained and forgotten ones."""
        y = torch.as_tensor(list(self.adapted_dataset.targets), dtype=torch.long)
        return self._split(torch.arange(len(y)), y)

    def relabelled(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each label moved to a uniformly drawn other class of the head (seeded).

        The GS-LoRA code adds ``random.randint(1, 100)`` to the label, which can point past
        the last class; drawing among the other classes keeps every label valid.
        """
        n = self.model.head.num_classes
        shift = torch.randint(1, n, y.shape, generator=generator)
        return (y + shift) % n

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        exp_id = int(self.experience.current_experience)
        generator = derived_generator(self.seed, exp_id)
        # lazy experiences: the same batches over sample indices, read batch by batch
        remain, forget = self.split_experience() if self.in_memory else self.split_indices()
        size = self.train_mb_size
        if self.data_mode == "paired":
            self.dataloader = PairedBatches(remain, forget, size, generator)
        elif self.data_mode == "remain":
            self.dataloader = PairedBatches(remain, None, size, generator)
        else:  # labels drawn anew each pass, as the official wrapper draws at each access
            self.dataloader = RelabelledBatches(remain, forget, self.relabelled, size, generator)
        if not self.in_memory:
            self.dataloader = IndexedBatches(
                self.adapted_dataset, self.dataloader, self.loader_workers
            )

    def _unpack_minibatch(self) -> None:
        super()._unpack_minibatch()
        if len(self.mbatch) > 3:  # paired batches carry the forget mask last
            self.forget_mask = self.mbatch.pop()
        else:
            self.forget_mask = torch.zeros(len(self.mbatch[1]), dtype=torch.bool)
        self.forget_mask = self.forget_mask.to(self.device)

    def retain_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of the current mini-batch's retained rows."""
        keep = ~self.forget_mask
        return self.mb_output[keep], self.mb_y[keep]

    def forget_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of the current mini-batch's forget rows."""
        return self.mb_output[self.forget_mask], self.mb_y[self.forget_mask]

    # ---------------------------------------------------------------- hooks
    def model_adaptation(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        model = self.model if model is None else model
        if self.is_training and self.request is not None:
            self.current_classes = list(self.request.forget)
            self.seen_classes = list(range(model.head.num_classes))
        return model.to(self.device)

    def criterion(self) -> torch.Tensor:
        """Cross-entropy on the retained rows (the ``remain`` and ``relabel`` modes: on all)."""
        if not self.is_training:
            return F.cross_entropy(self.mb_output, self.mb_y)
        logits, y = self.retain_part()
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` for scoring (eval mode, in the run's precision, as float32)."""
        self.model.eval()
        with self.autocast():
            return to_float32(self.model(x))


class PairedBatches:
    """Mini-batches ``[x, y, t]`` of ``main`` (shuffled each pass); with ``extra``, each
    followed by the next batch of ``extra`` (cycled: reshuffled whenever a pass over it
    ends, and restarted with each pass over ``main``), as ``[x, y, t, is_extra]``."""

    def __init__(
        self,
        main: list[torch.Tensor],
        extra: list[torch.Tensor] | None,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.main, self.extra = main, extra
        self.batch_size = batch_size
        self.generator = generator
        self._extra_order: torch.Tensor | None = None
        self._extra_pos = 0

    def __len__(self) -> int:
        return -(-len(self.main[0]) // self.batch_size)

    def _take_extra(self) -> list[torch.Tensor]:
        """The next batch of ``extra`` as a DataLoader over it would give (the last one of
        a pass may be smaller), reshuffled when a pass ends (the GS-LoRA forget loader)."""
        assert self.extra is not None
        size = len(self.extra[0])
        if self._extra_order is None or self._extra_pos >= size:
            self._extra_order = torch.randperm(size, generator=self.generator)
            self._extra_pos = 0
        idx = self._extra_order[self._extra_pos : self._extra_pos + self.batch_size]
        self._extra_pos += len(idx)
        return [t[idx] for t in self.extra]

    def restart_extra(self) -> None:
        """Start a new pass over ``extra`` (each epoch: the official loops build a fresh
        iterator over the forget / retained loader at the start of every epoch)."""
        self._extra_order, self._extra_pos = None, 0

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        self.restart_extra()
        x, y = self.main
        order = torch.randperm(len(x), generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            bx, by = x[idx], y[idx]
            if self.extra is None or len(self.extra[0]) == 0:
                yield [bx, by, torch.zeros(len(by), dtype=torch.long)]
                continue
            fx, fy = self._take_extra()
            mask = torch.cat(
                [torch.zeros(len(by), dtype=torch.bool), torch.ones(len(fy), dtype=torch.bool)]
            )
            yield [
                torch.cat([bx, fx]),
                torch.cat([by, fy]),
                torch.zeros(len(mask), dtype=torch.long),
                mask,
            ]


class RelabelledBatches:
    """One pass: the retained samples and the forget samples mixed and shuffled, the forget
    samples under labels drawn anew at every pass (``relabel``; the official
    CLDatasetWrapper draws a new label at every access of a sample)."""

    def __init__(
        self,
        remain: list[torch.Tensor],
        forget: list[torch.Tensor],
        relabel: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.remain, self.forget, self.relabel = remain, forget, relabel
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return -(-(len(self.remain[0]) + len(self.forget[0])) // self.batch_size)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        (rx, ry), (fx, fy) = self.remain, self.forget
        mixed = [torch.cat([fx, rx]), torch.cat([self.relabel(fy, self.generator), ry])]
        yield from PairedBatches(mixed, None, self.batch_size, self.generator)


class IndexedBatches:
    """The mini-batches of ``plan`` (a :class:`PairedBatches` over sample indices) with the
    indices replaced by those samples of ``dataset``, read through a DataLoader with
    ``num_workers`` processes; the labels (relabelled ones too), task labels and forget
    mask stay the plan's."""

    def __init__(self, dataset: Any, plan: PairedBatches, num_workers: int = 0) -> None:
        self.dataset, self.plan, self.num_workers = dataset, plan, num_workers

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        batches = list(self.plan)  # this pass's draws, made as the in-memory pass makes them
        indices = [b[0].tolist() for b in batches]
        read = read_batches(self.dataset, indices, self.num_workers)
        for b, samples in zip(batches, read, strict=True):
            yield [samples[0], *b[1:]]


# ============================================================ official baselines
# The baselines of the GS-LoRA code (github bjzhb666/GS-LoRA: train/train_own_forget_cl.py,
# engine_cl.py, baselines/*.py, util/sgda_utils.py, scripts/run_cl_forget.sh), adapted to
# erasure requests. docs/methods.md ("Continual-forgetting baselines") says what each one
# does and where it departs from the official code.

TEACHERS = ("original", "request")


@dataclass
class BaselineConfig(ErasureConfig):
    """The official baselines' shared settings: batch 48, AdamW (timm's create_optimizer,
    weight decay 0.05), lr 1e-4, cosine schedule; epochs cut to keep an embedded run short."""

    epochs: int = 20
    batch_size: int = 48
    optimizer: str = "adamw"
    lr: float = 1.0e-4
    weight_decay: float = 0.05
    lr_schedule: str = "cosine"
    min_lr: float = 1.0e-5  # the schedules decay to this lr, not 0 (timm's --min-lr)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("strategy.min_lr", self.min_lr, 0.0, self.lr)


@dataclass
class TeacherConfig(BaselineConfig):
    # "original": the model before the first request, kept for every request (the official
    # code deep-copies it once, before its task loop); "request": the model at the start
    # of each request
    teacher: str = "original"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.teacher", self.teacher, TEACHERS)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no parameter requiring grad."""
    twin = copy.deepcopy(model)
    twin.eval()
    twin.requires_grad_(False)
    return twin


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters that require grad, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh weights for ``model``, drawn from ``seed`` (the global RNG state is kept):
    every module's own ``reset_parameters`` (PyTorch's default init), then the
    ``init_weights`` of modules that have one (timm's ViT: position embedding, class token,
    truncated-normal linear layers), which is what building the model anew gives."""
    devices = sorted({p.device.index for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        for module in model.modules():
            init = getattr(module, "init_weights", None)
            if callable(init):
                init()


# ------------------------------------------------------------------ regularisers
Importance = dict[str, torch.Tensor]


def l2_importance(params: dict[str, nn.Parameter]) -> Importance:
    """Importance 1 for every parameter: the penalty is a plain squared L2 distance."""
    return {n: torch.ones_like(p) for n, p in params.items()}


def ewc_importance(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    params: dict[str, nn.Parameter],
) -> Importance:
    """The official EWC importance (calculate_importance_ewc): in eval mode, for each
    mini-batch ``b`` the gradient ``g_b`` of its mean cross-entropy; importance
    ``sum_b |b| g_b^2 / (number of batches)`` (with one-sample batches: the mean squared
    per-sample gradient, the empirical Fisher diagonal)."""
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    with _eval_mode(model):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads, strict=True):
                if g is not None:
                    imp[name] += g.detach().pow(2) * len(x)
            n_batches += 1
    return {n: v / max(n_batches, 1) for n, v in imp.items()}


def mas_importance(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    params: dict[str, nn.Parameter],
) -> Importance:
    """The official MAS importance (calculate_importance_mas): in eval mode, for each
    mini-batch the gradient of the mean squared logit; importance = the mean over batches
    of its absolute value."""
    imp = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    with _eval_mode(model):
        for x, _ in batches:
            loss = model(x).pow(2).mean()
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads, strict=True):
                if g is not None:
                    imp[name] += g.detach().abs()
            n_batches += 1
    return {n: v / max(n_batches, 1) for n, v in imp.items()}


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened and concatenated into one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def anchor_penalty(
    params: Sequence[torch.Tensor], anchors: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``sum_t sum_i importance_t,i (p_i - p*_t,i)^2`` (the official get_reg_loss, before
    its lambda) over the (importance, anchor weights) pairs ``anchors``, each flattened
    (:func:`flat`) in the order of ``params``."""
    p = flat(params)
    total = p.new_zeros(())
    for importance, anchor in anchors:
        total = total + (importance * (p - anchor).pow(2)).sum()
    return total


class _eval_mode:
    """Context: ``model`` in eval mode, its previous mode restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """SCRUB's DistillKL: ``KL(softmax(t / T) || softmax(s / T)) T^2``, mean over rows."""
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; 0 for no rows."""
    return F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0


# ------------------------------------------------------------------ batch plans
class ForgetLedBatches(PairedBatches):
    """The official LwF / DER loops: an epoch is one pass over the forget samples (labels
    drawn anew each pass); each forget batch is followed by ``n_remain`` batches of the
    retained samples (cycled, reshuffled whenever a pass over them ends), as
    ``[x, y, t, group]``: group 0 marks the forget rows, k the k-th retained batch."""

    def __init__(
        self,
        forget: list[torch.Tensor],
        remain: list[torch.Tensor],
        relabel: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
        batch_size: int,
        generator: torch.Generator,
        n_remain: int = 1,
    ) -> None:
        super().__init__(forget, remain, batch_size, generator)
        self.relabel, self.n_remain = relabel, n_remain

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        self.restart_extra()
        fx, fy = self.main
        fy = self.relabel(fy, self.generator)
        order = torch.randperm(len(fx), generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            xs, ys = [fx[idx]], [fy[idx]]
            groups = [torch.zeros(len(idx), dtype=torch.long)]
            for k in range(1, self.n_remain + 1 if len(self.extra[0]) else 1):
                bx, by = self._take_extra()
                xs.append(bx)
                ys.append(by)
                groups.append(torch.full((len(by),), k, dtype=torch.long))
            group = torch.cat(groups)
            yield [torch.cat(xs), torch.cat(ys), torch.zeros_like(group), group]


class ScrubPasses:
    """One SCRUB super-epoch (baselines/SCRUBtrain.py): ``inner`` passes; each of the first
    ``n_max`` is a pass over the forget samples (max steps) then one over the retained
    samples (min steps), the others a pass over the retained samples only. Batches come as
    ``[x, y, t, tag]`` with ``tag = [0 (max) or 1 (min), pass index]``."""

    def __init__(self, forget: PairedBatches, remain: PairedBatches, inner: int, n_max: int):
        self.forget, self.remain, self.inner, self.n_max = forget, remain, inner, n_max

    def __len__(self) -> int:
        return min(self.n_max, self.inner) * len(self.forget) + self.inner * len(self.remain)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for i in range(self.inner):
            if i < self.n_max:
                for b in self.forget:
                    yield [*b[:3], torch.tensor([0, i])]
            for b in self.remain:
                yield [*b[:3], torch.tensor([1, i])]


# ------------------------------------------------------------------ strategies
class _Baseline(ErasureStrategy):
    """What the official baselines share: batch plans read in memory or lazily, and the
    frozen teacher (LwF, DER++, SCRUB: ``cfg.teacher``)."""

    def __init__(self, *, model: ClassifierModel, cfg: ErasureConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.teacher: nn.Module | None = None

    def _request_generator(self, *salt: int) -> torch.Generator:
        return derived_generator(self.seed, int(self.experience.current_experience), *salt)

    def _request_data(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(x or sample indices, y) of the request's retained and forget samples."""
        return self.split_experience() if self.in_memory else self.split_indices()

    def _loader(self, plan: Any) -> Any:
        """``plan`` itself in memory; its batches read from the dataset when lazy."""
        if self.in_memory:
            return plan
        return IndexedBatches(self.adapted_dataset, plan, self.loader_workers)

    def _retained_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The request's retained samples in shuffled mini-batches, on the device."""
        remain, _ = self._request_data()
        plan = PairedBatches(remain, None, self.train_mb_size, self._request_generator(1))
        for b in self._loader(plan):
            yield b[0].to(self.device), b[1].to(self.device)

    def _take_teacher(self) -> nn.Module:
        if self.teacher is None or getattr(self.cfg, "teacher", "original") == "request":
            self.teacher = frozen_copy(self.model)
        return self.teacher

    def _set_lr(self, factor: float) -> None:
        """The schedules' lr ``factor`` in [0, 1] taken between ``min_lr`` and ``lr``."""
        floor = getattr(self.cfg, "min_lr", 0.0)
        for group in self.optimizer.param_groups:
            group["lr"] = floor + (self.cfg.lr - floor) * factor


@dataclass
class FinetuneRetainConfig(BaselineConfig):
    epochs: int = 40


class FinetuneRetain(_Baseline):
    """Fine-tune the whole model (head frozen) on the retained data of each request: the
    forgotten classes fade only because they are no longer trained on. Not one of the
    official baselines: their recipe (lr, optimiser, schedule) on the retained data only."""

    Config = FinetuneRetainConfig
    data_mode = "remain"


@dataclass
class RetrainConfig(BaselineConfig):
    freeze_head: bool = False  # a fresh model: its head trains too
    epochs: int = 30
    lr: float = 3.0e-4
    lr_schedule: str = "warmup_cosine"
    warmup_epochs: int = 2  # linear warm-up (per step) over this many epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.warmup_epochs", self.warmup_epochs, allow_zero=True)


class Retrain(_Baseline):
    """Retrain from scratch: at each request the model (backbone and head) is initialised
    anew from the run's seed and trained on the retained samples only."""

    Config = RetrainConfig
    cfg: RetrainConfig
    data_mode = "remain"

    def adapt_to_experience(self) -> None:
        seed = hash((self.seed, int(self.experience.current_experience))) % 2**63
        reinitialise(self.model, seed)

    def warmup_steps(self) -> int:
        return self.cfg.warmup_epochs * len(self.dataloader)


@dataclass
class AnchorConfig(BaselineConfig):
    reg_lambda: float = 0.1  # weight of the penalty

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.reg_lambda", self.reg_lambda, allow_zero=True)


class _Anchored(_Baseline):
    """L2 / EWC / MAS: cross-entropy on the forget samples relabelled to other classes and
    the retained samples (--replay), plus ``reg_lambda sum_t sum_i importance_t,i
    (p_i - p*_t,i)^2``. Before each request t, ``p*_t`` = the weights then and
    ``importance_t`` computed on the request's retained samples; the terms of all requests
    so far add up (the official code without --online).

    Not Avalanche's EWCPlugin / MASPlugin: they compute importances after an experience on
    its own data (here the relabelled forget samples as well), give no penalty during the
    first experience, and MAS keeps one decayed importance and one anchor; the official
    code anchors every request, the first included, on retained data (see
    docs/methods.md)."""

    Config = AnchorConfig
    cfg: AnchorConfig
    data_mode = "relabel"

    def __init__(self, *, model: ClassifierModel, cfg: AnchorConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        #: per request so far: (importance, anchor weights), flattened in the order of
        #: :attr:`anchor_names`
        self.anchors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.anchor_names: list[str] = []

    def importance(self, params: dict[str, nn.Parameter]) -> Importance:
        raise NotImplementedError

    def adapt_to_experience(self) -> None:
        params = trainable_named(self.model)
        if self.anchors and list(params) != self.anchor_names:
            raise RuntimeError("the trainable parameters changed between requests")
        self.anchor_names = list(params)
        importance = self.importance(params)
        self.anchors.append(
            (flat(importance[n] for n in params), flat(p.detach() for p in params.values()))
        )

    def penalty(self) -> torch.Tensor:
        """The regulariser before ``reg_lambda``."""
        params = trainable_named(self.model)
        return anchor_penalty([params[n] for n in self.anchor_names], self.anchors)

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if self.is_training and self.anchors and self.cfg.reg_lambda > 0:
            loss = loss + self.cfg.reg_lambda * self.penalty()
        return loss


@dataclass
class L2Config(AnchorConfig):
    reg_lambda: float = 0.1


class L2(_Anchored):
    """Relabelled forget data + retained data, anchored by a plain squared L2 distance."""

    Config = L2Config

    def importance(self, params: dict[str, nn.Parameter]) -> Importance:
        return l2_importance(params)


@dataclass
class EWCConfig(AnchorConfig):
    reg_lambda: float = 10.0


class EWC(_Anchored):
    """Relabelled forget data + retained data, anchored with the Fisher diagonal of the
    retained data (Kirkpatrick et al. 2017)."""

    Config = EWCConfig

    def importance(self, params: dict[str, nn.Parameter]) -> Importance:
        return ewc_importance(self.model, self._retained_batches(), params)


@dataclass
class MASConfig(AnchorConfig):
    reg_lambda: float = 0.005


class MAS(_Anchored):
    """Relabelled forget data + retained data, anchored with the output-sensitivity
    importance of the retained data (Aljundi et al. 2018)."""

    Config = MASConfig

    def importance(self, params: dict[str, nn.Parameter]) -> Importance:
        return mas_importance(self.model, self._retained_batches(), params)


class _ForgetLed(_Baseline):
    """Epochs led by the relabelled forget samples, each batch followed by retained
    batches (:class:`ForgetLedBatches`); :attr:`row_group` marks the rows."""

    data_mode = "relabel"
    n_remain = 1

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        remain, forget = self._request_data()
        plan = ForgetLedBatches(
            forget,
            remain,
            self.relabelled,
            self.train_mb_size,
            self._request_generator(),
            self.n_remain,
        )
        self.dataloader = self._loader(plan)

    def _unpack_minibatch(self) -> None:
        group = self.mbatch.pop()
        self.mbatch.append(group == 0)  # the base's forget mask
        super()._unpack_minibatch()
        self.row_group = group.to(self.device)

    def adapt_to_experience(self) -> None:
        self._take_teacher()


@dataclass
class LwFConfig(TeacherConfig):
    epochs: int = 40
    kd_weight: float = 0.5  # lambda_kd of the distillation on the retained rows
    remain_weight: float = 10.0  # weight of the retained rows' cross-entropy
    temperature: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.kd_weight", self.kd_weight, allow_zero=True)
        check_positive("strategy.remain_weight", self.remain_weight, allow_zero=True)
        check_positive("strategy.temperature", self.temperature)


class LwF(_ForgetLed):
    """LwF as the official Lwftrain.py: per step, cross-entropy on a batch of relabelled
    forget samples + ``remain_weight`` x cross-entropy on a retained batch +
    ``kd_weight`` x distillation of the teacher's logits on that retained batch
    (Avalanche's ``LearningWithoutForgetting``, over every class)."""

    Config = LwFConfig
    cfg: LwFConfig

    def __init__(self, *, model: ClassifierModel, cfg: LwFConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.lwf = LearningWithoutForgetting(alpha=cfg.kd_weight, temperature=cfg.temperature)

    def adapt_to_experience(self) -> None:
        self.lwf.prev_model = self._take_teacher()
        self.lwf.prev_classes_by_task[0] = set(range(self.model.head.num_classes))

    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return super().criterion()
        out, y, g = self.mb_output, self.mb_y, self.row_group
        f, r = g == 0, g == 1
        loss = _ce(out[f], y[f]) + self.cfg.remain_weight * _ce(out[r], y[r])
        if bool(r.any()) and self.cfg.kd_weight > 0:
            loss = loss + self.lwf(self.mb_x[r], out[r], self.model)
        return loss


@dataclass
class DERppConfig(TeacherConfig):
    epochs: int = 40
    lr: float = 1.0e-3
    alpha: float = 0.005  # weight of the feature distillation on a retained batch
    beta: float = 0.005  # weight of the cross-entropy on a second retained batch (0: DER)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        check_positive("strategy.beta", self.beta, allow_zero=True)


class DERpp(_ForgetLed):
    """DER++ as the official DERtrain.py: per step, cross-entropy on a batch of relabelled
    forget samples + ``alpha`` x squared L2 distance (summed) between the backbone features
    of a retained batch and the teacher's + ``beta`` x cross-entropy on the next retained
    batch. The "buffer" is the request's retained data with the teacher's features."""

    Config = DERppConfig
    cfg: DERppConfig

    def __init__(self, *, model: ClassifierModel, cfg: DERppConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.n_remain = 2 if cfg.beta > 0 else 1

    def forward(self) -> torch.Tensor:
        if not self.is_training:
            return super().forward()
        self.mb_features = self.model.backbone(self.mb_x)
        return self.model.head(self.mb_features)

    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return super().criterion()
        out, y, g = self.mb_output, self.mb_y, self.row_group
        f, r1, r2 = g == 0, g == 1, g == 2
        loss = _ce(out[f], y[f]) + self.cfg.beta * _ce(out[r2], y[r2])
        if bool(r1.any()) and self.cfg.alpha > 0:
            with torch.no_grad():
                target = self.teacher.backbone(self.mb_x[r1])
            loss = loss + self.cfg.alpha * (self.mb_features[r1] - target).pow(2).sum()
        return loss


@dataclass
class SCRUBConfig(TeacherConfig):
    epochs: int = 2  # super-epochs (the official SCRUB_superepoch)
    optimizer: str = "adam"
    lr: float = 1.0e-4
    weight_decay: float = 5.0e-4
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    inner_epochs: int = 10  # passes per super-epoch
    max_epochs: int = 5  # of which the first ones also take max steps on the forget data
    kd_T: float = 2.0
    gamma: float = 0.99  # weight of the min steps' cross-entropy
    alpha: float = 0.001  # weight of the min steps' distillation
    smoothing: float = 0.0  # SGDA smoothing: weight of the distance to the averaged model
    swa_beta: float = 0.1  # the averaged model moves by this much at each super-epoch end
    lr_decay_epoch: int = 100  # lr x lr_decay_rate once 15 x super-epoch + pass > this
    lr_decay_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.inner_epochs", self.inner_epochs)
        check_positive("strategy.max_epochs", self.max_epochs, allow_zero=True)
        check_positive("strategy.kd_T", self.kd_T)
        check_positive("strategy.smoothing", self.smoothing, allow_zero=True)
        check_range("strategy.swa_beta", self.swa_beta, 0.0, 1.0)


class SCRUB(_Baseline):
    """SCRUB (Kurmanji et al. 2023) as the official SCRUBtrain.py: each super-epoch is
    ``inner_epochs`` passes; the first ``max_epochs`` passes take max steps on the forget
    samples (minimise ``-KL(teacher || student)``) and then min steps on the retained
    samples, the rest min steps only (``gamma`` CE + ``alpha`` KL to the teacher). With
    ``smoothing`` > 0 (SCRUB-S), every step adds ``smoothing`` x the distance to an
    averaged copy of the model updated at each super-epoch end."""

    Config = SCRUBConfig
    cfg: SCRUBConfig
    data_mode = "remain"

    def __init__(self, *, model: ClassifierModel, cfg: SCRUBConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.averaged: AveragedModel | None = None
        self.phase, self.pass_index = 1, 0

    def make_train_dataloader(self, shuffle: bool = True, **kwargs: Any) -> None:
        remain, forget = self._request_data()
        g = self._request_generator()
        size = self.train_mb_size
        plan = ScrubPasses(
            PairedBatches(forget, None, size, g),
            PairedBatches(remain, None, size, g),
            self.cfg.inner_epochs,
            self.cfg.max_epochs,
        )
        self.dataloader = self._loader(plan)

    def adapt_to_experience(self) -> None:
        self._take_teacher()
        if self.cfg.smoothing > 0 and self.averaged is None:
            beta = self.cfg.swa_beta
            self.averaged = AveragedModel(
                self.model, avg_fn=lambda avg, new, _n: (1 - beta) * avg + beta * new
            )

    def _unpack_minibatch(self) -> None:
        tag = self.mbatch.pop()
        super()._unpack_minibatch()
        self.phase, self.pass_index = int(tag[0]), int(tag[1])

    def _before_training_iteration(self, **kwargs: Any) -> None:
        epoch = 15 * self.clock.train_exp_epochs + self.pass_index  # the official count
        decay = self.cfg.lr_decay_rate if epoch > self.cfg.lr_decay_epoch else 1.0
        self._set_lr(decay)
        super()._before_training_iteration(**kwargs)

    def _after_training_epoch(self, **kwargs: Any) -> None:
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        super()._after_training_epoch(**kwargs)

    def smoothing_term(self) -> torch.Tensor:
        """``smoothing sum_i ||p_i - p^avg_i||_F`` (the official param_dist)."""
        if self.averaged is None:
            return torch.zeros((), device=self.device)
        dist = [
            torch.linalg.vector_norm(p - q)
            for p, q in zip(self.model.parameters(), self.averaged.module.parameters(), strict=True)
        ]
        return self.cfg.smoothing * torch.stack(dist).sum()

    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return super().criterion()
        with torch.no_grad():
            target = self.teacher(self.mb_x)
        kd = distill_kl(self.mb_output, target, self.cfg.kd_T)
        if self.phase == 0:  # max step: move away from the teacher on forget samples
            return -kd + self.smoothing_term()
        ce = F.cross_entropy(self.mb_output, self.mb_y)
        return self.cfg.gamma * ce + self.cfg.alpha * kd + self.smoothing_term()
