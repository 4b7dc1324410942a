"""Numerics of a run: mixed precision (``precision``) and deterministic algorithms
(``deterministic``), two top-level keys of conf/config.yaml.

**Precision.** ``fp32`` (default) changes nothing. ``bf16`` runs the learner's forward
passes (and its loss) under ``torch.autocast(device_type, dtype=torch.bfloat16)``, on CPU
or CUDA, with no loss scaling (bfloat16 has float32's exponent range). ``fp16`` runs them
under ``torch.autocast("cuda", dtype=torch.float16)`` with a ``torch.amp.GradScaler``;
it needs a CUDA device (PyTorch does not train in float16 autocast on CPU). Parameters,
gradients and optimizer state stay float32 in every mode; the gradients are unscaled
right after backward, so every hook that reads or edits them (gradient projections,
masks, clipping) sees their true values. A learner gets its :class:`Precision` from the
runner (:func:`apply_precision`) once the protocol has built it: the learner knows where
its forward passes are (``clbench.strategies.base.CLStrategy`` wraps the forward and loss
of Avalanche's loops; the test-time learners their own forward calls), and statistics
computed outside them (covariances, Fisher information, stored logits, prototypes) stay
float32. Code inside a forward pass that needs float32 linear algebra (orthogonality
penalties, key matching, Gram matrices) opens :func:`full_precision`.

**Determinism.** :func:`set_deterministic` turns on PyTorch's deterministic algorithms
(``warn_only``: an operation without a deterministic implementation warns instead of
failing), makes cuDNN pick deterministic convolution algorithms without autotuning, and
sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set) for deterministic cuBLAS; the runner
calls it before any CUDA work of the job.

Importing this module imports no torch (the config check reads :data:`PRECISIONS`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from clbench.checks import check_choice
from clbench.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: the values of the ``precision`` key
PRECISIONS = ("fp32", "bf16", "fp16")
#: the autocast dtype of each mixed precision (a torch dtype's name)
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: cuBLAS's workspace setting for deterministic results (PyTorch's reproducibility notes)
CUBLAS_WORKSPACE = ":4096:8"


def check_precision(precision: str, device: torch.device, device_name: str = "") -> None:
    """One :class:`ConfigError` line if ``precision`` is not a choice or cannot run on
    ``device`` (``device_name``: the ``device`` key as given, for the message)."""
    import torch

    check_choice("precision", precision, PRECISIONS)
    given = device_name or str(device)
    where = given if given == str(device) else f"{given}, here {device}"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"precision=fp16 needs a CUDA device (device={where}); use precision=bf16 on CPU"
        )
    if (
        precision == "bf16"
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise ConfigError(
            f"precision=bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or "
            f"newer; device={where} has none); use precision=fp16 on this GPU"
        )


def to_float32(value: Any) -> Any:
    """``value`` with a float16 / bfloat16 tensor cast to float32 (differentiably); any
    other value (float32 tensors, tuples, None) unchanged."""
    import torch

    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


class Precision:
    """How a learner runs its forward passes, backward and optimizer steps.

    ``autocast()`` is the context of a forward pass; ``backward(loss, optimizer)`` and
    ``step(optimizer)`` replace ``loss.backward()`` and ``optimizer.step()``. In ``fp32``
    they are exactly those calls and ``autocast()`` does nothing.
    """

    def __init__(self, name: str = "fp32", device: str | torch.device = "cpu") -> None:
        check_choice("precision", name, PRECISIONS)
        self.name = name
        self.device_type = str(device).partition(":")[0]  # cuda:1 -> cuda
        self.dtype_name = DTYPES.get(name)
        if name == "fp16" and self.device_type != "cuda":
            raise ConfigError("precision=fp16 needs a CUDA device; use precision=bf16 on CPU")
        self.scaler: torch.amp.GradScaler | None = None
        self.reset()

    @property
    def enabled(self) -> bool:
        """Whether forward passes run in a lower precision (bf16, fp16)."""
        return self.dtype_name is not None

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None in fp32)."""
        import torch

        return None if self.dtype_name is None else getattr(torch, self.dtype_name)

    def reset(self) -> None:
        """A fresh loss scaler (fp16): its scale back to the initial 2**16."""
        if self.name == "fp16":
            import torch

            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a forward pass: autocast to ``dtype``, or nothing in fp32."""
        if self.dtype_name is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        retain_graph: bool | None = None,
    ) -> None:
        """``loss.backward()``; fp16: of the scaled loss, then the gradients of
        ``optimizer``'s parameters unscaled (so hooks after backward see true values)."""
        if self.scaler is None:
            loss.backward(retain_graph=retain_graph)
            return
        self.scaler.scale(loss).backward(retain_graph=retain_graph)
        if _has_gradients(optimizer):  # else step() skips: nothing for the scaler to record
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; fp16: skipped when a gradient is inf / NaN, then the scale
        is updated (GradScaler's rule)."""
        if self.scaler is None:
            optimizer.step()
            return
        if not _has_gradients(optimizer):
            return  # a plain step() would change nothing, and GradScaler refuses it
        self.scaler.step(optimizer)
        self.scaler.update()

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device_type!r})"


#: what a learner runs with until the runner sets its precision
FP32 = Precision()


def _has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Inside a forward pass: autocast off (CPU and CUDA) for the block, so its matrix
    products run in the precision of their inputs (give them float32: ``.float()``)."""
    import torch

    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def apply_precision(learner: Any, name: str) -> None:
    """Give the learner the run's precision (:meth:`Learner.set_precision`); one
    :class:`ConfigError` line for a mixed precision and a learner that cannot take it."""
    setter = getattr(learner, "set_precision", None)
    if setter is None:
        if name != "fp32":
            raise ConfigError(
                f"precision={name}: the learner {type(learner).__name__} has no set_precision "
                "(it is no clbench Learner); use precision=fp32"
            )
        return
    setter(name)


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms on or off for this process (see the module docstring).

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)``, cuDNN deterministic
    and not autotuned, ``CUBLAS_WORKSPACE_CONFIG`` set to ``:4096:8`` unless the
    environment sets it (cuBLAS reads it at the process's first cuBLAS call). Off:
    PyTorch's non-deterministic defaults, with cuDNN's autotuner on (the fastest
    convolution algorithms for the shapes seen).
    """
    import torch

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled
