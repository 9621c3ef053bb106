"""The op framework: declare an op once and get a real torch op with validation, dispatch, fake and autograd.

    op = define_op(
        "layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor",
        validate=...,    # raises ValueError/TypeError; runs before any kernel and in the fake (compile, meta)
        reference=...,   # plain PyTorch, any device and dtype: the fallback and the test oracle
        cpp=Kernel(run, unsupported), triton=Kernel(run, unsupported),
        fake=...,        # output metadata only
        backward=..., setup_context=...,   # torch.library.register_autograd, optional
    )

All callables take the op's arguments in schema order; the first argument is the tensor whose device
picks the backend. `Kernel.unsupported(*args)` returns why that kernel cannot take these arguments (a
string) or None; then the call goes to the reference and `fastllm.explain` shows the reason.
"""

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastllm import _backend, _ext


@dataclass(frozen=True)
class Kernel:
    run: Callable
    unsupported: Callable[..., str | None] = lambda *args: None
    avx512: bool = False  # C++ kernels: whether there is an AVX-512 version (else AVX2 runs under isa avx512)


@functools.cache
def triton_missing() -> str | None:
    """Why Triton cannot be used at all in this process, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable(name: str, device: str) -> str | None:
    """Why backend `name` cannot run at all for `device` tensors in this process (not about one call's shapes)."""
    if name == "cpp":
        if device != "cpu":
            return f"the C++ kernels take CPU tensors, got {device}"
        if _ext.C is None:
            return f"C++ extension not available: {_ext.STATUS}"
    elif name == "triton":
        missing = triton_missing()
        if missing:
            return missing
        if device == "cpu" and not triton_interpret():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set before fastllm's kernels are imported)"
        if device not in ("cuda", "cpu"):
            return f"no Triton kernels for {device} tensors"
    return None


def _why_not(name: str, kernel: Kernel | None, device: str, args) -> str | None:
    if kernel is None:
        return f"no {name} kernel for this op"
    return _unavailable(name, device) or kernel.unsupported(*args)


def _choose(kernels: dict, args) -> tuple[str, Callable | None, str]:
    """(backend, run or None for the reference, reason)."""
    device = args[0].device.type
    wanted = _backend.get_backend()
    if wanted == "reference":
        return "reference", None, "backend 'reference' requested"
    if wanted == "auto":
        order = {"cuda": ["triton"], "cpu": ["cpp"]}.get(device, [])
    else:
        order = [wanted]
    reasons = []
    for name in order:
        why = _why_not(name, kernels.get(name), device, args)
        if why is None:
            detail = "interpreter" if device == "cpu" else "GPU kernel"
            if name == "cpp":
                detail = f"{_ext.kernel_isa(kernels[name].avx512, args)} kernel"
            return name, kernels[name].run, detail
        reasons.append(f"{name}: {why}")
    reason = "; ".join(reasons) or f"no fast kernel for {device} tensors"
    if wanted != "auto" and _unavailable(wanted, device):
        _warn_forced(wanted, device, _unavailable(wanted, device))
    return "reference", None, reason


@functools.cache
def _warn_forced(wanted: str, device: str, why: str) -> None:
    """A backend asked for by name that cannot run here says so once (not only in fastllm.explain). A call whose
    shape or dtype one kernel does not take (float64, head_dim > 256, empty) is recorded by explain only."""
    warnings.warn(f"fastllm: backend {wanted!r} was requested but cannot run {device} tensors here ({why}); "
                  "the ops run on the reference path", RuntimeWarning, stacklevel=4)  # fmt: skip


def define_op(
    schema: str,
    *,
    validate: Callable,
    reference: Callable,
    fake: Callable,
    cpp: Kernel | None = None,
    triton: Kernel | None = None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
):
    """Register `fastllm::<schema>` as a torch.library.custom_op; return torch.ops.fastllm.<name>.default.

    Calling the OpOverload rather than the CustomOpDef skips a Python wrapper layer (~30 us per eager call here).
    """
    name = schema.split("(", 1)[0]
    kernels = {"cpp": cpp, "triton": triton}

    def impl(*args):
        validate(*args)
        backend_name, run, reason = _choose(kernels, args)
        if _backend.recording():
            _backend.record(name, backend_name, reason, args[0])
        return reference(*args) if run is None else run(*args)

    def fake_impl(*args):
        validate(*args)
        return fake(*args)

    op = torch.library.custom_op(f"fastllm::{name}", impl, mutates_args=(), schema=schema[len(name) :])
    op.register_fake(fake_impl)
    if backward is not None:
        # The backend override is per thread; autograd may run the backward on another thread, so the backend
        # in force at the forward is captured and re-entered for the backward ops.
        def setup(ctx, inputs, output):
            ctx.fastllm_backend = _backend.get_backend()
            setup_context(ctx, inputs, output)

        def bwd(ctx, *grads):
            with _backend.backend(ctx.fastllm_backend):
                return backward(ctx, *grads)

        op.register_autograd(bwd, setup_context=setup)
    return getattr(torch.ops.fastllm, name).default
