"""Backend selection and the record of which path each op call took.

FASTLLM_BACKEND=auto|triton|cpp|reference (read at each call) or `with fastllm.backend("cpp"):`
(which wins over the environment). `auto` means Triton for CUDA tensors, C++ for CPU tensors and the
reference for anything else. A backend that cannot take a call (wrong device, dtype, missing extension)
falls back to the reference implementation; the reason is recorded, never raised.

`with fastllm.explain() as log:` collects one `Dispatch` per op call; FASTLLM_DEBUG=1 logs each to
stderr through the "fastllm" logger.
"""

import contextlib
import logging
import os
from dataclasses import dataclass

BACKENDS = ("auto", "triton", "cpp", "reference")

logger = logging.getLogger("fastllm")
if os.environ.get("FASTLLM_DEBUG", "0") == "1" and not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[fastllm] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG)

# A process-wide stack, not thread-local: autograd may run backward on another thread, and the backward
# ops must see the backend the user asked for.
_override: list[str] = []
_listeners: list[list["Dispatch"]] = []


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def get_backend() -> str:
    """The backend requested now: the innermost `fastllm.backend(...)`, else FASTLLM_BACKEND, else auto."""
    if _override:
        return _override[-1]
    env = os.environ.get("FASTLLM_BACKEND", "")
    return _check_name(env, "FASTLLM_BACKEND") if env else "auto"


@contextlib.contextmanager
def backend(name: str):
    """Run the ops inside the block on `name` ("auto", "triton", "cpp" or "reference")."""
    _override.append(_check_name(name, "fastllm.backend"))
    try:
        yield
    finally:
        _override.pop()


@dataclass(frozen=True)
class Dispatch:
    """One op call: which backend ran it and why."""

    op: str
    backend: str
    reason: str
    device: str
    dtype: str
    shape: tuple

    def __str__(self) -> str:
        return f"{self.op}{list(self.shape)} {self.dtype} on {self.device}: {self.backend} ({self.reason})"


@contextlib.contextmanager
def explain():
    """Collect the dispatch decisions of the ops called inside the block.

    >>> with fastllm.explain() as log:
    ...     fastllm.layer_norm(x, w, b)
    >>> print(log[0])   # layer_norm[4, 768] torch.float32 on cpu: cpp (avx2 kernel)
    """
    records: list[Dispatch] = []
    _listeners.append(records)
    try:
        yield records
    finally:
        # by identity: list.remove compares by value, and an outer log can equal an inner one (both empty)
        del _listeners[next(i for i, r in enumerate(_listeners) if r is records)]


def recording() -> bool:
    return bool(_listeners) or logger.isEnabledFor(logging.DEBUG)


def record(op: str, backend_name: str, reason: str, x) -> None:
    d = Dispatch(op, backend_name, reason, str(x.device), str(x.dtype).replace("torch.", ""), tuple(x.shape))
    for records in _listeners:
        records.append(d)
    logger.debug("%s", d)
