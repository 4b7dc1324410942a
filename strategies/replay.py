"""Rehearsal baselines of class-incremental learning on Avalanche's replay buffers: experience
replay (``er``), Dark Experience Replay (``der``) and DER++ (``derpp``).

DER and DER++ are Buzzega et al., "Dark Experience for General Continual Learning: a Strong,
Simple Baseline" (NeurIPS 2020; official code github.com/aimagelab/mammoth, also the base of
SparCL, github.com/neu-spiral/SparCL). Per training step a memory batch of ``batch_size_mem``
buffered samples ``(x', y', z')`` (``z'``: the logits stored with the sample) is prepended to
the current mini-batch ``(x, y)``, one forward runs on both, and the loss is

- ``er``: the cross-entropy of every row, current and memory (mammoth's ``er``: one CE over
  the concatenated batch),
- ``der``: ``CE(f(x), y) + alpha MSE(f(x'), z')``,
- ``derpp``: ``CE(f(x), y) + alpha MSE(f(x'), z') + beta CE(f(x'), y')``.

What comes from Avalanche (0.6): the buffers, i.e. ``ReservoirSamplingBuffer`` /
``ClassBalancedBuffer`` / ``ExperienceBalancedBuffer`` for ER and ``avalanche.training.DER``'s
``ClassBalancedBufferWithLogits`` (per-class reservoirs; after each experience it computes
the logits of the experience's samples with the model in eval mode and keeps them with the
samples) for DER / DER++, updated in ``_after_training_exp``; and Avalanche DER's training
step: memory rows prepended to ``mbatch[0..2]`` in ``_before_forward``, one batch for both
memory terms, the loss above.

Why composition and not ``class DER(CLStrategy, avalanche.training.DER)``: of Avalanche
DER's methods, ``training_epoch`` builds the loss inline (no method a subclass such as
SparCL could override, and it ignores clbench's ``loss_mask`` / label smoothing),
``_before_training_exp`` draws memory batches from a ``DataLoader`` shuffled by torch's
global RNG over the Avalanche dataset sample by sample (not a generator derived from the
run seed, nor clbench's in-memory batches), ``_after_training_exp`` updates the buffer with
the global RNG, and ``__init__`` cannot receive the options through ``CLStrategy``'s
constructor; four of its five methods would be overridden. So :class:`ReplayStrategy`
holds Avalanche's buffer and runs the standard Avalanche training loop (every hook
fires), with the prepend in ``_before_forward`` and the loss in :meth:`replay_loss`
(called by ``criterion``).

Head (``full_head``, default true): mammoth's DER / DER++ / ER train one head over all the
scenario's classes from the start, and Avalanche's DER stores logits of the whole head, so
the head grows at the first experience to the scenario's number of classes (1 + the
largest class id over the experiences of the experience's ``origin_stream``, the train
stream). The current rows' CE is over every output: with ``loss_mask: seen`` that is every
class of the scenario, future ones included (mammoth's CE); ``current`` masks it to the
experience's classes (SparCL). Memory terms use every output. Evaluation reads the logits
of the classes seen so far only (mammoth's class-IL evaluation: argmax over
``outputs[:, :n_seen]``), as a growing head would give. DER / DER++ need the full head
(stored logits must have every column); ER also runs on the growing head
(``full_head: false``).

Where clbench differs from mammoth (Avalanche's DER has the same differences):

- the buffer is updated after each experience, not by reservoir insertion of each
  mini-batch during training; DER / DER++ buffers are class-balanced;
- the stored logits are the eval-mode outputs of the model at the end of the experience
  that stored the sample (mammoth: the training-mode outputs of that step);
- DER++ draws one memory batch for both terms (mammoth: two independent batches);
- a memory smaller than ``batch_size_mem`` is replayed whole at each step (Avalanche's DER
  skips replay until the memory holds a full batch; mammoth draws what there is).

Seeding and checkpoints: the buffer's reservoir weights are drawn under a torch RNG
seeded from (run seed, experience) with the global state kept, and the memory batches come
from a generator derived from (run seed, experience), so a run is deterministic and a
resumed run replays the same batches. A checkpoint stores the buffer as data (per group:
each sample's (experience, index in that experience's training dataset), the reservoir
weights and, for DER, the stored logits) and the buffer is rebuilt from the scenario's
train stream at the next experience (:class:`SampleMemory`, after
``mil_baselines.BagMemory``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import make_avalanche_dataset
from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
from avalanche.benchmarks.utils.flat_data import FlatData
from avalanche.training.storage_policy import ExemplarsBuffer, ExperienceBalancedBuffer
from avalanche.training.supervised.der import ClassBalancedBufferWithLogits
from clbench.strategies.base import CLStrategy, StrategyConfig, training_ce
from clbench.strategies.mil_baselines import BUFFER_POLICIES, BagMemory, tag_bags

from clbench.checks import check_choice, check_positive
from clbench.data import TensorBatches, materialise, read_batches
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.seeding import derived_generator

#: ``derived_generator(seed, experience, STREAM)`` keys: the buffer update's RNG and the
#: memory batches' order
BUFFER_STREAM, MEMORY_STREAM = 1, 2


# --------------------------------------------------------------------- memory
class SampleMemory(BagMemory):
    """A rehearsal memory of samples kept by an Avalanche storage policy, checkpointable.

    ``policy`` is one of ``BagMemory``'s (reservoir, class_balanced, experience_balanced);
    ``with_logits`` uses Avalanche DER's ``ClassBalancedBufferWithLogits`` instead (items
    ``(x, y, task, logits)``). Each sample is tagged with its reference (experience, index
    in that experience's dataset); :meth:`state` / :meth:`restore` add the stored logits to
    ``BagMemory``'s references and weights.
    """

    def __init__(self, policy: str, size: int, with_logits: bool = False) -> None:
        self.with_logits = with_logits
        super().__init__("class_balanced" if with_logits else policy, size)

    def _new_storage(self) -> ExemplarsBuffer:
        if self.with_logits:
            return ClassBalancedBufferWithLogits(self.size, adaptive_size=True)
        return super()._new_storage()

    def update(
        self,
        dataset: Any,
        exp_id: int,
        seed: int,
        *,
        indices: list[int] | None = None,
        model: torch.nn.Module | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        """Offer the samples of experience ``exp_id`` (those at ``indices`` of ``dataset``;
        default all) to the policy, its random weights drawn under ``seed`` (the global RNG
        state is kept). With logits, ``model`` computes them (eval mode, batches of
        ``batch_size``), as Avalanche's DER does with the strategy."""
        tagged = tag_bags(dataset, exp_id)
        if indices is not None:
            tagged = tagged.subset(indices)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.with_logits:
                if model is None:
                    raise ValueError("a memory with logits needs the model to compute them")
                agent = SimpleNamespace(
                    experience=SimpleNamespace(dataset=tagged),
                    model=model,
                    train_mb_size=batch_size,
                    device=device,
                )
                self.storage.update(agent)
            elif isinstance(self.storage, ExperienceBalancedBuffer):
                self.storage.post_adapt(None, SimpleNamespace(dataset=tagged))
            else:
                self.storage.update_from_dataset(tagged)  # type: ignore[attr-defined]
        self._refresh()

    def logits(self) -> torch.Tensor:
        """The stored logits, one row per memory sample (in ``dataset`` order)."""
        if not self.with_logits or len(self) == 0:
            return torch.zeros(0, 0)
        return torch.stack(list(self.dataset.logits))

    def state(self) -> dict[str, Any]:
        if self.pending is not None:  # restored but not rebuilt yet
            return self.pending
        state = super().state()
        if self.with_logits:
            for group, (_, buffer) in zip(state["groups"], self._groups(), strict=True):
                rows = list(buffer.buffer.logits) if len(buffer.buffer) else []
                group["logits"] = torch.stack(rows) if rows else torch.zeros(0, 0)
        return state

    def restore(self, stream: Any) -> None:
        if self.pending is None:
            return
        state = self.pending
        super().restore(stream)
        if not self.with_logits:
            return
        self.storage.seen_classes = {int(c) for c in state["seen"]}  # type: ignore[attr-defined]
        for group, (_, buffer) in zip(state["groups"], self._groups(), strict=True):
            if len(buffer.buffer) == 0:
                continue
            rows = [z.float().cpu() for z in group["logits"]]  # as Avalanche DER stores them
            attribute = TensorDataAttribute(
                FlatData([rows], discard_elements_not_in_indices=True),
                name="logits",
                use_in_getitem=True,
            )
            buffer.buffer = make_avalanche_dataset(buffer.buffer, data_attributes=[attribute])
        self._refresh()


# -------------------------------------------------------------------- configs
@dataclass
class ReplayConfig(StrategyConfig):
    """Options shared by the rehearsal baselines (mammoth's seq-cifar10 setting)."""

    epochs: int = 50
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    # samples in the memory (mammoth --buffer_size)
    mem_size: int = 500
    # memory rows per step (mammoth --minibatch_size, Avalanche batch_size_mem)
    batch_size_mem: int = 32
    # one head over all the scenario's classes from the first experience (mammoth)
    full_head: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.mem_size", self.mem_size)
        check_positive("strategy.batch_size_mem", self.batch_size_mem)


@dataclass
class ERConfig(ReplayConfig):
    # Avalanche storage policy: reservoir (mammoth) | class_balanced | experience_balanced
    buffer_policy: str = "reservoir"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy.buffer_policy", self.buffer_policy, BUFFER_POLICIES)


@dataclass
class DERConfig(ReplayConfig):
    lr: float = 0.03
    # weight of MSE(f(x'), z') (mammoth best_args seq-cifar10 der, buffer 500: 0.3)
    alpha: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        if not self.full_head:
            raise ConfigError(
                "invalid value for strategy.full_head: False; DER / DER++ store logits of "
                "every class, which needs the full head: use strategy.full_head=true"
            )

    @property
    def beta(self) -> float:
        """DER has no CE on the memory labels (DER++'s ``beta``)."""
        return 0.0


@dataclass
class DERppConfig(DERConfig):
    # SparCL's script (--buffer_weight 0.1); mammoth best_args seq-cifar10 derpp 500: 0.2
    alpha: float = 0.1
    # weight of CE(f(x'), y') (SparCL --buffer_weight_beta 0.5; mammoth best_args: 0.5)
    beta: float = 0.5  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.beta", self.beta, allow_zero=True)


# ----------------------------------------------------------------- strategies
class ReplayStrategy(CLStrategy):
    """Base of the rehearsal baselines: the Avalanche buffer, its update after each
    experience, the memory batches prepended to the mini-batch, the full head.

    During training ``mem_rows`` is the number of memory rows at the front of the current
    mini-batch (0 while the memory is empty) and ``mem_logits`` their stored logits (DER);
    :meth:`replay_loss` is the training loss.
    """

    Config: ClassVar[type[StrategyConfig]] = ReplayConfig
    cfg: ReplayConfig
    #: whether the buffer keeps logits (Avalanche DER's buffer)
    with_logits: ClassVar[bool] = False

    def __init__(self, *, model: ClassifierModel, cfg: ReplayConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.memory = SampleMemory(
            getattr(cfg, "buffer_policy", "class_balanced"),
            cfg.mem_size,
            with_logits=self.with_logits,
        )
        self.mem_rows = 0
        self.mem_logits: torch.Tensor | None = None
        self._memory_batches: Iterator[list[torch.Tensor]] | None = None

    @property
    def storage_policy(self) -> ExemplarsBuffer:
        """The Avalanche buffer (replaced when a checkpoint's memory is rebuilt)."""
        return self.memory.storage

    # ------------------------------------------------------------------ head
    def scenario_classes(self) -> int:
        """Classes of the scenario: 1 + the largest class id over the train stream."""
        stream = self.experience.origin_stream
        return 1 + max(int(c) for e in stream for c in e.classes_in_this_experience)

    def model_adaptation(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """With ``full_head``, the head grows to every class before the base's growth to
        the classes seen (then a no-op), so the head is initialised once."""
        target = self.model if model is None else model
        if self.is_training and self.cfg.full_head:
            target.head.grow(self.scenario_classes())  # type: ignore[operator]
        return super().model_adaptation(target)

    def forward(self) -> torch.Tensor:
        """Training: every output; evaluation: the classes seen so far (mammoth)."""
        out = super().forward()
        if self.is_training or not self.cfg.full_head:
            return out
        return out[:, : max(self.seen_classes, default=-1) + 1]

    # ---------------------------------------------------------------- memory
    def memory_candidates(self) -> list[int] | None:
        """Indices of the experience's training dataset offered to the buffer at its end
        (default None: every sample)."""
        return None

    def _before_training_exp(self, **kwargs: Any) -> None:
        self.memory.restore(self.experience.origin_stream)
        self._memory_batches = self._memory_stream(int(self.experience.current_experience))
        super()._before_training_exp(**kwargs)

    def _memory_stream(self, exp_id: int) -> Iterator[list[torch.Tensor]] | None:
        """Endless memory batches of ``min(batch_size_mem, memory size)`` rows: seeded
        shuffled passes over the memory (Avalanche DER's cycled loader), None if empty."""
        n = len(self.memory)
        if n == 0:
            return None
        order = TensorBatches(
            [torch.arange(n)],
            min(self.cfg.batch_size_mem, n),
            shuffle=True,
            generator=derived_generator(self.seed, exp_id, MEMORY_STREAM),
            drop_last=True,
        )
        dataset = self.memory.dataset
        data = materialise(dataset) if self.in_memory else None

        def batches() -> Iterator[list[torch.Tensor]]:
            while True:
                for (rows,) in order:
                    if data is not None:
                        yield [t[rows] for t in data]
                    else:
                        yield next(read_batches(dataset, [rows.tolist()]))

        return batches()

    def _before_forward(self, **kwargs: Any) -> None:
        """Prepend a memory batch to ``mbatch[0..2]`` (x, y, task label); any further
        element of the mini-batch is left as it is."""
        self.mem_rows, self.mem_logits = 0, None
        if self.is_training and self._memory_batches is not None:
            batch = [t.to(self.device) for t in next(self._memory_batches)]
            for i in range(3):
                self.mbatch[i] = torch.cat([batch[i].to(self.mbatch[i].dtype), self.mbatch[i]])
            self.mem_rows = int(batch[0].shape[0])
            self.mem_logits = batch[3] if len(batch) > 3 else None
        super()._before_forward(**kwargs)

    def _after_training_exp(self, **kwargs: Any) -> None:
        exp_id = int(self.experience.current_experience)
        self._memory_batches = None
        self.memory.update(
            self.experience.dataset,
            exp_id,
            derived_generator(self.seed, exp_id, BUFFER_STREAM).initial_seed(),
            indices=self.memory_candidates(),
            model=self.model,
            batch_size=self.train_mb_size,
            device=self.device,
        )
        super()._after_training_exp(**kwargs)

    # ------------------------------------------------------------------ loss
    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return super().criterion()
        return self.replay_loss()

    def current_loss(self) -> torch.Tensor:
        """CE of the current rows (after the memory rows), with the config's loss mask."""
        m, cfg = self.mem_rows, self.cfg
        return training_ce(
            self.mb_output[m:],
            self.mb_y[m:],
            cfg.loss_mask,
            self.current_classes,
            cfg.label_smoothing,
        )

    def memory_ce(self) -> torch.Tensor:
        """CE of the memory rows over every output."""
        m = self.mem_rows
        return F.cross_entropy(
            self.mb_output[:m], self.mb_y[:m], label_smoothing=self.cfg.label_smoothing
        )

    def replay_loss(self) -> torch.Tensor:
        """The training loss of the mini-batch (default: :meth:`current_loss`)."""
        return self.current_loss()

    # ------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "memory": self.memory.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.memory.load_state(state.pop("memory"))
        super().load_extra_state(state)


class ER(ReplayStrategy):
    """Experience replay: one CE over the current and replayed memory rows (mammoth's er).

    The memory is one of Avalanche's storage policies (default reservoir)."""

    Config = ERConfig
    cfg: ERConfig

    def replay_loss(self) -> torch.Tensor:
        """Mean CE over all rows: the current rows' (with the loss mask) and the memory
        rows' weighted by their counts (one CE over the batch when ``loss_mask: seen``)."""
        loss = self.current_loss()
        m, n = self.mem_rows, int(self.mb_y.shape[0])
        if m == 0:
            return loss
        return ((n - m) * loss + m * self.memory_ce()) / n


class DERpp(ReplayStrategy):
    """DER++: replay of stored logits (MSE, alpha) and labels (CE, beta), Avalanche's buffer.

    Loss ``CE(current rows) + alpha MSE(memory rows' logits, stored logits) + beta CE(memory
    rows, their labels)``, the memory Avalanche DER's class-balanced buffer with logits.

    Contract for subclasses (SparCL):

    1. after the memory rows are prepended, the mini-batch has ``self.mem_rows`` memory
       rows at the FRONT (0 while the memory is empty); ``self.mem_logits`` are their
       stored logits;
    2. only ``mbatch[0]``, ``mbatch[1]``, ``mbatch[2]`` (x, y, task label) get memory rows;
       any further element (e.g. example ids as ``mbatch[3]``) is left untouched;
    3. the loss is :meth:`replay_loss` (:meth:`current_loss` + the memory terms), called by
       ``criterion``; training runs Avalanche's standard loop, so ``_before_backward``,
       ``_after_backward``, ``_before_update``, ``_after_update``,
       ``_before_training_epoch`` and ``make_train_dataloader`` all fire (the memory batches
       are built in ``_before_training_exp``, independently of the train loader);
    4. ``self.storage_policy`` (the Avalanche buffer) is updated in ``_after_training_exp``
       with the samples :meth:`memory_candidates` names (default all) and their logits.
    """

    Config: ClassVar[type[StrategyConfig]] = DERppConfig
    cfg: DERppConfig
    with_logits = True

    def replay_loss(self) -> torch.Tensor:
        loss = self.current_loss()
        if self.mem_rows == 0:
            return loss
        alpha, beta = self.cfg.alpha, self.cfg.beta
        if alpha > 0:
            out = self.mb_output[: self.mem_rows]
            assert self.mem_logits is not None
            loss = loss + alpha * F.mse_loss(out, self.mem_logits.to(out.dtype))
        if beta > 0:
            loss = loss + beta * self.memory_ce()
        return loss


class DER(DERpp):
    """DER: replay of stored logits (MSE, alpha) on Avalanche's buffer; DER++ with beta = 0."""

    Config = DERConfig
    cfg: DERConfig  # type: ignore[assignment]
