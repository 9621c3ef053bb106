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

Two ways into an op (`Op.__call__` picks per call):
- the registered torch op (torch.ops.fastllm.<name>): dispatcher, fake, autograd, tracing. Taken whenever any
  of them may be needed: grad mode on with an input that requires grad, forward-mode AD, torch.compile /
  dynamo, a Python dispatch or torch-function mode (make_fx, FakeTensorMode, `with torch.device(...)`), a tensor
  subclass (FakeTensor, FunctionalTensor, ...), or `fastllm.explain` / FASTLLM_DEBUG recording.
- the direct path otherwise (inference: the decode loop): validate, then the kernel chosen for (device,
  requested backend, ISA level) from a per-op cache, then the kernel's cheap per-call shape check. Same
  validation, same kernels, same results as through the op; about the cost of one torch op instead of the
  custom-op machinery (~30-60 us per call on the development machines).
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


_DIRECT_TYPES = (torch.Tensor, torch.nn.Parameter)  # exact types: any other subclass goes through the op
_MODE_KEYS = tuple(
    getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL")
    if hasattr(torch._C, "_TorchDispatchModeKey") and hasattr(torch._C._TorchDispatchModeKey, k)
)  # fmt: skip


_is_compiling = torch.compiler.is_compiling
_len_dispatch_stack, _len_function_stack = torch._C._len_torch_dispatch_stack, torch._C._len_torch_function_stack
_get_dispatch_mode, _is_grad_enabled = torch._C._get_dispatch_mode, torch.is_grad_enabled
_forward_ad = torch.autograd.forward_ad


def _direct_ok(args) -> bool:
    """Whether this call may skip the registered op (see the module docstring): nothing needs autograd, tracing
    or the dispatch record."""
    if _is_compiling():  # first: dynamo folds it to True and traces nothing below (it cannot trace a logger)
        return False
    if _backend.recording() or _len_dispatch_stack() or _len_function_stack():
        return False
    if _forward_ad._current_level >= 0:
        return False
    for key in _MODE_KEYS:
        if _get_dispatch_mode(key) is not None:
            return False
    grad = _is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _DIRECT_TYPES or (grad and a.requires_grad):
                return False
        elif isinstance(a, (list, tuple)) and not _direct_ok_seq(a, grad):
            return False
    return True


def _direct_ok_seq(seq, grad: bool) -> bool:
    for a in seq:
        if isinstance(a, torch.Tensor) and (type(a) not in _DIRECT_TYPES or (grad and a.requires_grad)):
            return False
    return True


def _device_type(t: torch.Tensor) -> str:
    # t.device builds a torch.device object (~0.8 us); the flags are ~0.1 us
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


class Op:
    """A fastllm op: call it like the torch op (schema order). `.overload` is torch.ops.fastllm.<name>.default
    (what opcheck, torch.compile graphs and autograd see)."""

    def __init__(self, name: str, overload, validate: Callable, reference: Callable, kernels: dict):
        self.name, self.overload = name, overload
        self._validate, self._reference, self._kernels = validate, reference, kernels
        # (device type, requested backend, ISA level) -> (Kernel, or None for the reference)
        self._chosen: dict[tuple, Kernel | None] = {}
        self.direct_calls = 0  # calls that took the direct path (tests read it)

    def __call__(self, *args):
        if not _direct_ok(args):
            return self.overload(*args)
        self._validate(*args)
        return self._direct(args)

    def prevalidated(self, *args):
        """As calling the op, for a public function that has just run the op's validation on these arguments
        itself (with its own argument names): the direct path does not run it a second time."""
        if not _direct_ok(args):
            return self.overload(*args)
        return self._direct(args)

    def _kernel(self, device: str) -> Kernel | None:
        wanted = _backend.get_backend()
        key = (device, wanted, _ext.C.isa() if _ext.C is not None else "")
        try:
            return self._chosen[key]
        except KeyError:
            kernel = self._chosen[key] = self._process_choice(device, wanted)
            return kernel

    def cpp_lane(self, args) -> bool:
        """Whether a call with these arguments may take a hand-written lean path to the C++ kernel (a public
        function's decode fast lane, which checks the common case itself and falls back to calling the op):
        the direct path is allowed and the C++ kernel is the one chosen for CPU tensors now."""
        if not _direct_ok(args) or self._kernel("cpu") is not self._kernels.get("cpp"):
            return False
        self.direct_calls += 1
        return True

    def _direct(self, args):
        kernel = self._kernel(_device_type(args[0]))
        self.direct_calls += 1
        if kernel is None or kernel.unsupported(*args) is not None:
            return self._reference(*args)
        return kernel.run(*args)

    def _process_choice(self, device: str, wanted: str) -> Kernel | None:
        """The kernel `_choose` would take for `device` before looking at one call's shapes (and its warning)."""
        if wanted == "reference":
            return None
        order = {"cuda": ["triton"], "cpu": ["cpp"]}.get(device, []) if wanted == "auto" else [wanted]
        for name in order:
            kernel = self._kernels.get(name)
            if kernel is not None and _unavailable(name, device) is None:
                return kernel
        if wanted != "auto" and _unavailable(wanted, device):
            _warn_forced(wanted, device, _unavailable(wanted, device))
        return None

    def __repr__(self) -> str:
        return f"fastllm op {self.name} ({self.overload})"


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
    """Register `fastllm::<schema>` as a torch.library.custom_op; return an `Op` that calls it, or its kernels
    directly when nothing needs the registered op.

    The op path calls the OpOverload rather than the CustomOpDef: that skips a Python wrapper layer.
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
    return Op(name, getattr(torch.ops.fastllm, name).default, validate, reference, kernels)
