"""The classic and LoRA baselines of continual MIL, as compared in CoMEL (Hyun1A/CoMEL).

CoMEL's repository ships, next to its own method, these baselines on the aggregator
(``continual/main/continual_bag/*_trainer.py``, scripts ``continual/shell_scripts/``):

- ``mil_er``: experience replay of whole bags. Per step the current bag's cross-entropy
  plus that of ``replay_bags`` bags drawn from a rehearsal memory of ``mem_size`` bags.
- ``mil_derpp``: DER++. Memory bags keep the logits they had when stored; per step
  ``CE(current) + alpha MSE(f(x'), z') + beta CE(f(x''), y'')``.
- ``mil_ewc``: Avalanche's ``EWCPlugin`` (online: one importance decayed by
  ``decay_factor``), over the aggregator and the head.
- ``mil_lwf``: Avalanche's ``LearningWithoutForgetting``: distillation of the previous
  model's logits on the old classes, temperature T.
- ``mil_lora`` / ``mil_olora`` / ``mil_inflora``: clbench's sequential LoRA, O-LoRA and
  InfLoRA on every linear of the aggregator (target ``linear``; the head lies outside).

The rehearsal memory is Avalanche's (``ReservoirSamplingBuffer``, ``ClassBalancedBuffer``,
``ExperienceBalancedBuffer``) over the experiences' datasets, updated after each
experience; each bag is tagged with its reference (experience, index) so that a
checkpoint stores the memory as data and file-backed bags stay on disk. Avalanche's
``ReplayPlugin`` cannot serve bags: its data loader concatenates a memory mini-batch to the
current one, and bags of different sizes do not stack into one tensor (nor does an
aggregator take more than one bag per forward); so the strategies below draw the memory
bags themselves and run one forward per bag.

Where clbench differs from CoMEL's trainers (each baseline there also adds CoMEL's own
pseudo-label instance loss; here they train on the bag label only):

- memory: Avalanche's policies update after each experience (CoMEL inserts each bag online
  after its step, mammoth-style); DER++ logits are those of the model at the end of the
  experience that stored the bag (Avalanche's DER).
- EWC: Avalanche's empirical Fisher (squared gradients of the bag's cross-entropy), over
  every parameter including the head; CoMEL weights each squared gradient by ``exp(CE)``
  and leaves the classifier out.
- LoRA family: as CoMEL's LoRA / InfLoRA baselines, the randomly initialised aggregator is
  trained whole on the first task (``full_first_task``) and adapters start with the
  second. CoMEL's "InfLoRA" draws A at random and orthogonalises it against earlier A's;
  ``mil_inflora`` is the method of the InfLoRA paper (strategies/inflora.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from avalanche.benchmarks.utils import make_avalanche_dataset
from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
from avalanche.benchmarks.utils.flat_data import FlatData
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.training import LearningWithoutForgetting
from avalanche.training.plugins import EWCPlugin
from avalanche.training.storage_policy import (
    ClassBalancedBuffer,
    ExemplarsBuffer,
    ExperienceBalancedBuffer,
    ReservoirSamplingBuffer,
)
from avalanche.training.utils import ParamData
from clbench.strategies.erasure import frozen_copy
from clbench.strategies.inflora import InfLoRA, InfLoRAConfig
from clbench.strategies.lora import OLoRA, OLoRAConfig, SequentialLoRA, SequentialLoRAConfig
from clbench.strategies.mil import BagLearner, MILConfig, MILStrategy

from clbench.adapters.lora import lora_layers
from clbench.checks import check_choice, check_positive
from clbench.errors import ConfigError
from clbench.models import ClassifierModel
from clbench.seeding import derived_generator

#: Avalanche storage policies of the rehearsal memory
BUFFER_POLICIES = ("reservoir", "class_balanced", "experience_balanced")
EWC_MODES = ("online", "separate")
#: a bag's reference: (experience id, index in that experience's dataset)
Ref = tuple[int, int]


def _seed(*parts: int) -> int:
    """A seed for ``torch.manual_seed`` derived from ``parts`` (as derived_generator)."""
    return hash(tuple(parts)) % 2**63


# --------------------------------------------------------------------- memory
def tag_bags(dataset: Any, exp_id: int) -> Any:
    """``dataset`` with a ``bag_ref`` data attribute: row i is ``(exp_id, i)`` (it follows
    the bags through Avalanche's subsets and concatenations)."""
    refs = [torch.tensor([exp_id, i]) for i in range(len(dataset))]
    attribute = TensorDataAttribute(
        FlatData([refs], discard_elements_not_in_indices=True),
        name="bag_ref",
        use_in_getitem=False,
    )
    return make_avalanche_dataset(dataset, data_attributes=[attribute])


class BagMemory:
    """A rehearsal memory of whole bags kept by an Avalanche storage policy.

    :meth:`update` feeds the policy an experience's dataset (tagged by :func:`tag_bags`),
    with the policy's random weights drawn from a given seed; ``dataset`` is then the
    memory (items ``(bag (N, D), label, task)``) and ``refs`` its bags' references.
    :meth:`state` is the memory as data (references and reservoir weights);
    :meth:`load_state` + :meth:`restore` rebuild it from the experiences' datasets.
    """

    def __init__(self, policy: str, size: int) -> None:
        check_choice("strategy.buffer_policy", policy, BUFFER_POLICIES)
        self.policy, self.size = policy, size
        self.storage = self._new_storage()
        self.dataset: Any = None
        self.refs: list[Ref] = []
        self.pending: dict[str, Any] | None = None

    def _new_storage(self) -> ExemplarsBuffer:
        if self.policy == "reservoir":
            return ReservoirSamplingBuffer(self.size)
        if self.policy == "class_balanced":
            return ClassBalancedBuffer(self.size, adaptive_size=True)
        return ExperienceBalancedBuffer(self.size, adaptive_size=True)

    def __len__(self) -> int:
        return len(self.refs)

    def update(self, dataset: Any, exp_id: int, seed: int) -> None:
        """Offer the bags of experience ``exp_id`` to the policy (seeded, the global RNG
        state is kept)."""
        tagged = tag_bags(dataset, exp_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(self.storage, ExperienceBalancedBuffer):
                self.storage.post_adapt(None, SimpleNamespace(dataset=tagged))
            else:
                self.storage.update_from_dataset(tagged)  # type: ignore[attr-defined]
        self._refresh()

    def _refresh(self) -> None:
        self.dataset = self.storage.buffer
        if len(self.dataset) == 0:
            self.refs = []
        else:
            self.refs = [(int(r[0]), int(r[1])) for r in self.dataset.bag_ref]

    def bag(self, i: int) -> tuple[torch.Tensor, int, Ref]:
        """Memory bag ``i``: features ``(N, D)``, label and reference."""
        x, y = self.dataset[i][:2]
        return x, int(y), self.refs[i]

    def _groups(self) -> list[tuple[int, ReservoirSamplingBuffer]]:
        if isinstance(self.storage, ReservoirSamplingBuffer):
            return [(0, self.storage)]
        return list(self.storage.buffer_groups.items())  # type: ignore[attr-defined]

    def state(self) -> dict[str, Any]:
        """The memory as data: per reservoir group its capacity, references and weights."""
        if self.pending is not None:  # restored but not rebuilt yet
            return self.pending
        groups = []
        for key, group in self._groups():
            buf = group.buffer
            refs = buf.bag_ref if len(buf) else []
            groups.append(
                {
                    "key": int(key),
                    "max_size": int(group.max_size),
                    "refs": torch.stack([r.long() for r in refs])
                    if len(buf)
                    else torch.zeros(0, 2, dtype=torch.long),
                    "weights": group._buffer_weights.clone(),
                }
            )
        seen = sorted(getattr(self.storage, "seen_classes", set()))
        return {"groups": groups, "seen": seen, "num_exps": getattr(self.storage, "_num_exps", 0)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Keep ``state`` until :meth:`restore` can read the experiences' datasets."""
        self.pending = state

    def restore(self, stream: Any) -> None:
        """Rebuild the memory :meth:`load_state` got from ``stream`` (the train stream)."""
        if self.pending is None:
            return
        state, self.pending = self.pending, None
        tagged: dict[int, Any] = {}

        def rows(refs: torch.Tensor) -> Any:
            parts = []
            for e, i in refs.tolist():
                if e not in tagged:
                    tagged[e] = tag_bags(stream[e].dataset, e)
                parts.append(tagged[e].subset([i]))
            return concat_datasets(parts)

        self.storage = self._new_storage()
        for g in state["groups"]:
            group = ReservoirSamplingBuffer(int(g["max_size"]))
            group.buffer = rows(g["refs"])
            group._buffer_weights = g["weights"].float().cpu()  # Avalanche draws them on CPU
            if isinstance(self.storage, ReservoirSamplingBuffer):
                self.storage = group
            else:
                self.storage.buffer_groups[int(g["key"])] = group  # type: ignore[attr-defined]
        if isinstance(self.storage, ClassBalancedBuffer):
            self.storage.seen_classes = {int(c) for c in state["seen"]}
        if isinstance(self.storage, ExperienceBalancedBuffer):
            self.storage._num_exps = int(state["num_exps"])
        self._refresh()


@dataclass
class MILBaselineConfig(MILConfig):
    """MIL defaults of CoMEL's baselines: Adam 1e-4, weight decay 1e-5, one bag per batch,
    a cosine schedule restarted at each task (``--lr_sche cosine``)."""

    lr_schedule: str = "cosine"


@dataclass
class MILReplayConfig(MILBaselineConfig):
    # bags in the memory (CoMEL's scripts: --buffer_size 30)
    mem_size: int = 30
    # Avalanche storage policy: reservoir (CoMEL's Buffer) | class_balanced |
    # experience_balanced
    buffer_policy: str = "reservoir"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.mem_size", self.mem_size)
        check_choice("strategy.buffer_policy", self.buffer_policy, BUFFER_POLICIES)


class _BagReplay(MILStrategy):
    """Base of the rehearsal strategies: the memory, its update after each experience,
    seeded draws, and the memory in the checkpoint."""

    Config: ClassVar[type] = MILReplayConfig
    cfg: MILReplayConfig

    def __init__(self, *, model: ClassifierModel, cfg: MILReplayConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.memory = BagMemory(cfg.buffer_policy, cfg.mem_size)
        self._draws = torch.Generator()

    def _before_training_exp(self, **kwargs: Any) -> None:
        super()._before_training_exp(**kwargs)
        self.memory.restore(self.experience.origin_stream)
        self._draws = derived_generator(self.seed, int(self.experience.current_experience), 2)

    def _after_training_exp(self, **kwargs: Any) -> None:
        exp_id = int(self.experience.current_experience)
        self.memory.update(self.experience.dataset, exp_id, _seed(self.seed, exp_id, 1))
        self.memory_updated()
        super()._after_training_exp(**kwargs)

    def memory_updated(self) -> None:
        """Called after each memory update (DER++ stores the new bags' logits)."""

    def draw(self, k: int) -> list[int]:
        """``k`` distinct memory positions (fewer if the memory is smaller), seeded."""
        order = torch.randperm(len(self.memory), generator=self._draws)
        return order[:k].tolist()

    def memory_logits(self, i: int) -> tuple[torch.Tensor, int, Ref]:
        """Logits ``(C,)`` (train mode, with grad) of memory bag ``i``, its label and ref."""
        x, y, ref = self.memory.bag(i)
        return self.model(x.unsqueeze(0).to(self.device))[0], y, ref

    def _ce(self, logits: torch.Tensor, y: int) -> torch.Tensor:
        return F.cross_entropy(logits[None], torch.tensor([y], device=logits.device))

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "memory": self.memory.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.memory.load_state(state.pop("memory"))
        super().load_extra_state(state)


@dataclass
class MILERConfig(MILReplayConfig):
    # memory bags replayed per step (CoMEL's ER: 1, its loss added to the current bag's)
    replay_bags: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.replay_bags", self.replay_bags)


class MILER(_BagReplay):
    """Experience replay of bags: ``CE(current bag) + mean_k CE(memory bag k)``."""

    Config = MILERConfig
    cfg: MILERConfig

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if not self.is_training or len(self.memory) == 0:
            return loss
        replay = [self._ce(*self.memory_logits(i)[:2]) for i in self.draw(self.cfg.replay_bags)]
        return loss + torch.stack(replay).mean()


@dataclass
class MILDERppConfig(MILReplayConfig):
    # weight of MSE(logits of a memory bag, its stored logits) (CoMEL: --der_alpha 3.0)
    alpha: float = 3.0
    # weight of the memory bag's cross-entropy (CoMEL: 1, its plain loss; 0 gives DER)
    beta: float = 1.0
    # true (CoMEL's trainer): both terms on one memory bag; false (DER++ paper): the
    # cross-entropy on a second, independently drawn bag
    same_bag: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        check_positive("strategy.beta", self.beta, allow_zero=True)


class MILDERpp(_BagReplay):
    """DER++ on bags: the memory keeps each bag's logits from when it was stored."""

    Config = MILDERppConfig
    cfg: MILDERppConfig

    def __init__(self, *, model: ClassifierModel, cfg: MILDERppConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        #: the stored logits of every memory bag, by reference
        self.stored_logits: dict[Ref, torch.Tensor] = {}

    @torch.no_grad()
    def memory_updated(self) -> None:
        """Logits (eval mode) of the bags just stored; forget those of evicted bags."""
        was_training = self.model.training
        self.model.eval()
        try:
            kept: dict[Ref, torch.Tensor] = {}
            for i, ref in enumerate(self.memory.refs):
                if ref in self.stored_logits:
                    kept[ref] = self.stored_logits[ref]
                else:
                    x, _, _ = self.memory.bag(i)
                    kept[ref] = self.model(x.unsqueeze(0).to(self.device))[0].detach().cpu()
            self.stored_logits = kept
        finally:
            self.model.train(was_training)

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        cfg = self.cfg
        if not self.is_training or len(self.memory) == 0 or (cfg.alpha == 0 and cfg.beta == 0):
            return loss
        picks = self.draw(1 if cfg.same_bag else 2)
        out, y, ref = self.memory_logits(picks[0])
        if cfg.alpha > 0:
            z = self.stored_logits[ref].to(out.device)
            c = min(len(z), len(out))  # the head may have grown since the bag was stored
            loss = loss + cfg.alpha * F.mse_loss(out[:c], z[:c])
        if cfg.beta > 0:
            if not cfg.same_bag:
                out, y, _ = self.memory_logits(picks[-1])
            loss = loss + cfg.beta * self._ce(out, y)
        return loss

    def extra_state(self) -> dict[str, Any]:
        logits = {f"{e}:{i}": z for (e, i), z in self.stored_logits.items()}
        return {**super().extra_state(), "stored_logits": logits}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        stored = state.pop("stored_logits")
        self.stored_logits = {
            (int(k.split(":")[0]), int(k.split(":")[1])): v for k, v in stored.items()
        }
        super().load_extra_state(state)


# ------------------------------------------------------------- regularisers
@dataclass
class MILEWCConfig(MILBaselineConfig):
    # penalty weight (CoMEL: --e_lambda 10 class-incremental, 1.0 binary organ tasks)
    ewc_lambda: float = 10.0
    # online: one importance, decayed (CoMEL's online EWC); separate: one per experience
    mode: str = "online"
    # online mode: importance <- decay_factor x importance + new (CoMEL: --e_gamma 0.9)
    decay_factor: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.ewc_lambda", self.ewc_lambda, allow_zero=True)
        check_choice("strategy.mode", self.mode, EWC_MODES)
        check_positive("strategy.decay_factor", self.decay_factor, allow_zero=True)


def ewc_state(plugin: EWCPlugin) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """An Avalanche ``EWCPlugin``'s anchors and importances as tensors, by experience (the
    checkpoint form of the class-incremental and MIL EWC strategies)."""

    def tensors(tree: dict[int, dict[str, ParamData]]) -> dict[str, dict[str, torch.Tensor]]:
        return {str(t): {k: v.data.detach().clone() for k, v in d.items()} for t, d in tree.items()}

    return {
        "saved_params": tensors(plugin.saved_params),
        "importances": tensors(plugin.importances),
    }


def load_ewc_state(plugin: EWCPlugin, state: dict[str, dict[str, dict[str, torch.Tensor]]]) -> None:
    """Restore what :func:`ewc_state` saved into ``plugin``."""

    def params(tree: dict[str, dict[str, torch.Tensor]]) -> defaultdict:
        out: defaultdict = defaultdict(dict)
        for t, d in tree.items():
            out[int(t)] = {k: ParamData(k, init_tensor=v, device=v.device) for k, v in d.items()}
        return out

    plugin.saved_params = params(state["saved_params"])
    plugin.importances = params(state["importances"])


class MILEWC(MILStrategy):
    """EWC: Avalanche's ``EWCPlugin`` attached to the bag learner.

    The plugin computes importances after each experience with its own ``DataLoader`` over
    the experience (batch ``train_mb_size`` = 1: a bag collates to ``(1, N, D)``) and adds
    ``ewc_lambda x penalty`` to the loss before each backward from the second experience on.
    """

    Config = MILEWCConfig
    cfg: MILEWCConfig

    def __init__(
        self,
        *,
        model: ClassifierModel,
        cfg: MILEWCConfig,
        plugins: list[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        online = cfg.mode == "online"
        self.ewc = EWCPlugin(
            cfg.ewc_lambda, mode=cfg.mode, decay_factor=cfg.decay_factor if online else None
        )
        super().__init__(model=model, cfg=cfg, plugins=[*(plugins or []), self.ewc], **kwargs)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "ewc": ewc_state(self.ewc)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        load_ewc_state(self.ewc, state.pop("ewc"))
        super().load_extra_state(state)


@dataclass
class MILLwFConfig(MILBaselineConfig):
    # distillation weight (CoMEL: --lwf_alpha 0.3 class-incremental; 1.0 binary organ tasks)
    alpha: float = 0.3
    # softmax temperature of the distillation (CoMEL / mammoth: smooth(., 2))
    temperature: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("strategy.alpha", self.alpha, allow_zero=True)
        check_positive("strategy.temperature", self.temperature)


def teacher_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of ``model``. An aggregator keeps its last forward's outputs
    (``instances`` with their graph), which ``copy.deepcopy`` refuses: they are detached
    first."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())
    return frozen_copy(model)


class MILLwF(MILStrategy):
    """LwF: ``CE + alpha KL(softmax(old / T) || softmax(new / T))`` over the classes of
    earlier experiences, the teacher being the model as the previous experience left it
    (Avalanche's ``LearningWithoutForgetting``)."""

    Config = MILLwFConfig
    cfg: MILLwFConfig
    #: the classes of the experiences before the current one (the distilled units)
    STATE = ("past_classes",)

    def __init__(self, *, model: ClassifierModel, cfg: MILLwFConfig, **kwargs: Any) -> None:
        super().__init__(model=model, cfg=cfg, **kwargs)
        self.lwf = LearningWithoutForgetting(alpha=cfg.alpha, temperature=cfg.temperature)
        self.past_classes: list[int] = []

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        # the model now is the previous experience's (its head grown by units the
        # distillation never reads), so a restored run rebuilds the same teacher
        self.lwf.prev_model = teacher_copy(self.model) if self.past_classes else None
        self.lwf.prev_classes_by_task = defaultdict(set, {0: set(self.past_classes)})

    def criterion(self) -> torch.Tensor:
        loss = super().criterion()
        if self.is_training and self.lwf.prev_model is not None and self.cfg.alpha > 0:
            loss = loss + self.lwf(self.mb_x, self.mb_output, self.model)
        return loss

    def _after_training_exp(self, **kwargs: Any) -> None:
        self.past_classes = sorted(set(self.past_classes) | set(self.current_classes))
        super()._after_training_exp(**kwargs)


# ---------------------------------------------------------------- LoRA family
#: CoMEL's LoRA baselines: rank 16 (cdatmil_lora.py: self.rank = 16; --rank is unused),
#: scale 1 (network_alpha None), on every linear of the aggregator
COMEL_RANK = 16


class _FullFirstTask:
    """The first task trains the whole aggregator; adapters start with the second.

    CoMEL's LoRA baselines train the randomly initialised aggregator on task 0 and add
    their first LoRA after it (``after_task: expand_lora``): a frozen random aggregator
    would leave LoRA nothing to adapt. With ``full_first_task`` the base weights (and
    every other aggregator parameter) train on the first experience with the adapter
    blocks frozen (B = 0: they add nothing); from the second on, the base is frozen and
    the LoRA method runs as if that were its first task.
    """

    cfg: Any
    clock: Any
    model: ClassifierModel
    new_blocks: list[Any]
    #: whether the full task counts as a task of the method (InfLoRA's DualGPM schedule)
    counts_full_task: ClassVar[bool] = False

    def adapt_to_experience(self) -> None:
        trained = int(self.clock.train_exp_counter)
        if self.cfg.full_first_task and trained == 0:
            self.model.backbone.requires_grad_(True)
            for layer in self.lora_layers().values():  # type: ignore[attr-defined]
                layer.freeze_blocks()
            if self.counts_full_task:
                self.tasks_seen += 1  # type: ignore[has-type]
            return
        if self.cfg.full_first_task and trained == 1:
            self.model.backbone.requires_grad_(False)
            for block in self.new_blocks:
                block.requires_grad_(True)
        super().adapt_to_experience()  # type: ignore[misc]


@dataclass
class MILLoRAConfig(MILConfig, SequentialLoRAConfig):
    lr_schedule: str = "cosine"
    rank: int = COMEL_RANK
    alpha: float = float(COMEL_RANK)
    targets: list[str] = field(default_factory=lambda: ["linear"])
    # CoMEL: a fresh LoRA per task, earlier ones frozen (== merged into the base weights)
    merge_after_task: bool = True
    # train the whole aggregator on the first task, LoRA from the second (CoMEL)
    full_first_task: bool = True


class MILLoRA(BagLearner, _FullFirstTask, SequentialLoRA):
    """Sequential LoRA on every linear of the aggregator (CoMEL's LoRA baseline)."""

    Config = MILLoRAConfig
    cfg: MILLoRAConfig
    kind: ClassVar[str] = "mil"


@dataclass
class MILOLoRAConfig(MILConfig, OLoRAConfig):
    lr_schedule: str = "cosine"
    rank: int = COMEL_RANK
    alpha: float = float(COMEL_RANK)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["linear"])
    full_first_task: bool = True


class MILOLoRA(BagLearner, _FullFirstTask, OLoRA):
    """O-LoRA on every linear of the aggregator: a fresh LoRA per task, kept orthogonal
    to the frozen earlier ones."""

    Config = MILOLoRAConfig
    cfg: MILOLoRAConfig
    kind: ClassVar[str] = "mil"


@dataclass
class MILInfLoRAConfig(MILConfig, InfLoRAConfig):
    lr_schedule: str = "cosine"
    rank: int = COMEL_RANK
    alpha: float = float(COMEL_RANK)
    targets: list[str] = field(default_factory=lambda: ["linear"])
    # CoMEL's trainers keep the aggregator in train mode (dropout on)
    train_in_eval_mode: bool = False
    full_first_task: bool = True


class MILInfLoRA(BagLearner, _FullFirstTask, InfLoRA):
    """InfLoRA on every linear of the aggregator.

    The designed ``A_t`` takes the top ``rank`` left singular vectors of the layer's input
    covariance projected off the DualGPM subspace. An aggregator's first layer reads the
    instance features, whose width may be small (64 on digit_bags): when fewer than
    ``rank`` free directions carry energy, the remaining singular vectors are arbitrary
    and may lie in the protected subspace. Here every new ``A_t`` is therefore projected
    onto the free subspace after the design (rows already there are unchanged, the others
    shrink to zero), which keeps InfLoRA's interference-free property. ``rank`` may not
    exceed any adapted layer's input width.
    """

    Config = MILInfLoRAConfig
    cfg: MILInfLoRAConfig
    kind: ClassVar[str] = "mil"
    counts_full_task: ClassVar[bool] = True

    def prepare_model(self, model: Any) -> None:
        super().prepare_model(model)
        for name, layer in lora_layers(model).items():
            if self.cfg.rank > layer.in_features:
                raise ConfigError(
                    f"invalid value for strategy.rank: {self.cfg.rank}; layer {name!r} of the "
                    f"aggregator reads {layer.in_features} features and InfLoRA's A_t takes "
                    f"rank of its input directions: use strategy.rank<={layer.in_features}"
                )

    def adapt_to_experience(self) -> None:
        super().adapt_to_experience()
        new = {id(b) for b in self.new_blocks}
        with torch.no_grad():
            for name, layer in self.lora_layers().items():
                for block in layer.blocks:
                    if id(block) in new:
                        block.A.copy_(self.free_part(name, block.A))

    def free_part(self, name: str, a: torch.Tensor) -> torch.Tensor:
        """The rows of ``a`` projected onto the input directions DualGPM left free."""
        if name not in self.gpm.basis:
            return a
        u = self.gpm.basis[name].to(a)
        inside = (a @ u) @ u.T
        return a - inside if self.gpm.mode[name] == "remove" else inside
