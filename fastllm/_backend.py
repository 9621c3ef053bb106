"""Backend selection and the record of which path each op call took.

FASTLLM_BACKEND=auto|triton|cpp|reference (read at each call) or `with fastllm.backend("cpp"):`
(which wins over the environment). `auto` means Triton for CUDA tensors, C++ for CPU tensors and the
reference for anything else. A backend that cannot take a call (wrong device, dtype, missing extension)
falls back to the reference implementation; the reason is recorded, never raised, and a backend that was
asked for by name and cannot run warns once (per op and reason).

The override is per thread (a ContextVar): `with fastllm.backend(...)` in one thread does not change what
another thread runs. Autograd may run a backward on another thread; the ops capture the backend in force at
the forward and re-enter it for their backward (fastllm/_op.py).

`with fastllm.explain() as log:` collects one `Dispatch` per op call; FASTLLM_DEBUG=1 logs each to
stderr through the "fastllm" logger.
"""

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass

from fastllm._ext import env_choice

BACKENDS = ("auto", "triton", "cpp", "reference")

logger = logging.getLogger("fastllm")


if env_choice("FASTLLM_DEBUG", ("0", "1"), "0") == "1" and not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[fastllm] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG)

# Per thread (and per asyncio task): the innermost `fastllm.backend(...)`, or None.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastllm_backend", default=None)
# explain() logs are process-wide on purpose: a backward run by autograd on another thread is recorded too.
_listeners: list[list["Dispatch"]] = []


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def get_backend() -> str:
    """The backend requested now: the innermost `fastllm.backend(...)`, else FASTLLM_BACKEND, else auto."""
    name = _override.get()
    if name is not None:
        return name
    env = _getenv("FASTLLM_BACKEND")
    return _check_name(env, "FASTLLM_BACKEND") if env else "auto"


def _getenv(name: str) -> str:
    """os.environ.get(name, "") in ~0.1 us instead of ~1.5 us (it runs on every op call): CPython's os.environ keeps
    the encoded environment in `_data`; anything else falls back to the public lookup."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and os.name == "posix":
        value = data.get(name.encode())
        return value.decode() if value is not None else ""
    return os.environ.get(name, "")


@contextlib.contextmanager
def backend(name: str):
    """Run the ops inside the block on `name` ("auto", "triton", "cpp" or "reference")."""
    token = _override.set(_check_name(name, "fastllm.backend"))
    try:
        yield
    finally:
        _override.reset(token)


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


get_backend()  # a bad FASTLLM_BACKEND fails at import, naming the variable, rather than at the first op call
