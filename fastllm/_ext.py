"""Loads the C++ extension fastllm._C once, or says why it is not there; reads its enum codes and ISA levels.

Without it (no compiler at install time, FASTLLM_NO_CPP=1, a stale build) fastllm still imports, warns
once, and CPU ops take the reference path.

Environment, validated here at import (a bad value is a ValueError naming the variable and what it accepts;
unset or empty means the default):
    FASTLLM_NO_CPP=0|1                               1: do not load the extension (CPU ops run the reference)
    FASTLLM_ISA=auto|scalar|avx2|avx512|avx512_dot    the ISA level of the C++ kernels (default auto: the best
        this CPU and build run). Levels are ordered; each adds kernels to the one below: avx2 (every op),
        avx512 (AVX-512 F/BW/VL/DQ FMA kernels: the GEMM engine), avx512_dot (+ vdpbf16ps for bf16 GEMMs and
        vpdpbusd for W8A8 where the CPU has AVX512-BF16 / AVX512-VNNI). An op without a kernel at the level runs
        its kernel of the highest level below. A level this CPU or build cannot run is an error.
    FASTLLM_SPIN_US=0..1000000                      how long an idle worker of the C++ kernels' thread pool spins
        before it sleeps (default SPIN_US_DEFAULT; kernels/cpp/parallel.cpp reads it at the pool's first use)
"""

import importlib
import os
import warnings

import torch

ABI = 11  # must equal kAbi in kernels/cpp/bindings.cpp

ISA_CHOICES = ("auto", "scalar", "avx2", "avx512", "avx512_dot")  # the levels: C.isa_levels(), in this order


def env_choice(name: str, accepted: tuple[str, ...], default: str) -> str:
    """Environment variable `name` (unset or empty: `default`), which must be one of `accepted`."""
    value = os.environ.get(name, "") or default
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not valid; accepted values: {'|'.join(accepted)}")
    return value


def _load():
    if env_choice("FASTLLM_NO_CPP", ("0", "1"), "0") == "1":
        return None, "disabled by FASTLLM_NO_CPP=1"
    try:
        _C = importlib.import_module("fastllm._C")
    except ModuleNotFoundError:
        return None, "fastllm._C is not built (installed with FASTLLM_NO_CPP=1 or without a C++ compiler)"
    except ImportError as e:
        return None, f"fastllm._C did not load ({e}); reinstall with `pip install .`"
    if getattr(_C, "ABI", None) != ABI:
        return None, f"fastllm._C is a stale build (ABI {getattr(_C, 'ABI', None)}, expected {ABI}); reinstall"
    return _C, "loaded"


def _apply_isa(C, isa: str) -> None:
    try:
        C.set_isa(isa)
    except ValueError as e:
        runnable = "|".join(["auto"] + [name for name, why in C.isa_levels() if not why])
        raise ValueError(f"FASTLLM_ISA={isa!r}: {e}; this CPU and build accept {runnable}") from None


# The pool's default spin (kDefaultSpinUs in kernels/cpp/parallel.cpp, where the measure is).
SPIN_US_DEFAULT = 1000


def env_spin_us() -> int:
    """FASTLLM_SPIN_US (unset or empty: SPIN_US_DEFAULT): microseconds, a decimal integer in 0 .. 1000000."""
    value = os.environ.get("FASTLLM_SPIN_US", "")
    if not value:
        return SPIN_US_DEFAULT
    if not (value.isascii() and value.isdigit()) or int(value) > 1_000_000:
        raise ValueError(f"FASTLLM_SPIN_US={value!r} is not valid; accepted values: an integer 0..1000000 (us)")
    return int(value)


_isa = env_choice("FASTLLM_ISA", ISA_CHOICES, "auto")
SPIN_US = env_spin_us()
C, STATUS = _load()
if C is None:
    warnings.warn(f"fastllm: C++ extension not available: {STATUS}. CPU ops use the reference path.", stacklevel=2)
else:
    _apply_isa(C, _isa)
    STATUS = f"loaded ({C.isa()})"

# The extension's enum codes by table and name (empty without it: then no C++ kernel is ever called).
_CODES: dict[str, dict[str, int]] = {}
if C is not None:
    _CODES = {kind: dict(getattr(C, attr)) for kind, attr in (("dtype", "DTYPES"), ("activation", "ACTIVATIONS"),
              ("epilogue", "EPILOGUES"), ("layout", "LAYOUTS"), ("mask", "MASKS"))}  # fmt: skip
# torch dtype -> the DType code (the names in C.DTYPES are torch's)
DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, name): c for name, c in _CODES.get("dtype", {}).items()}


def code(kind: str, name: str) -> int:
    """The C++ enum code of `name` in table `kind`: dtype, activation, epilogue, layout or mask (bindings.cpp)."""
    return _CODES[kind][name]


def dot_kernel(dtype: torch.dtype) -> bool:
    """Whether the active ISA level runs an avx512_dot kernel for a GEMM with A and B both of `dtype`: vdpbf16ps
    (AVX512-BF16) for bfloat16, vpdpbusd (AVX512-VNNI) for int8. The packed-B layout follows (ops/gemm.py,
    ops/int8.py)."""
    if dtype is torch.bfloat16:  # (`is`: dtypes are singletons, and this runs on every GEMM call)
        feature = C.avx512bf16_available
    elif dtype is torch.int8:
        feature = C.avx512vnni_available
    else:
        return False
    return C.isa() == "avx512_dot" and feature()


def kernel_isa(avx512: bool, args) -> str:
    """The ISA level of the C++ kernel an op runs on `args` now (for explain). avx512: the op has AVX-512 kernels
    (the GEMM engine); others run their AVX2 kernel at levels above avx2. The dot kernels take GEMMs whose first
    two arguments (activation, weight) share a dot dtype; W8A8 without one runs the AVX2 kernel (vpmaddwd)."""
    isa = C.isa()
    if isa not in ("avx512", "avx512_dot"):
        return isa
    if not avx512:
        return "avx2"
    a, b = args[0], args[1] if len(args) > 1 else None
    if isa == "avx512_dot" and isinstance(b, torch.Tensor) and b.dtype == a.dtype and dot_kernel(a.dtype):
        return "avx512_dot"
    return "avx2" if a.dtype == torch.int8 else "avx512"


# Elements of work per thread below which a call stays on the calling thread (torch's own GRAIN_SIZE). The
# kernels run on fastllm's thread pool (kernels/cpp/parallel.h): a helper thread that is late only misses tasks,
# but waking it still costs microseconds, more than a tiny op's whole work.
GRAIN = 32768


def num_threads(work: int | None = None) -> int:
    """Threads for a kernel call: torch.get_num_threads(), fewer for small `work` (elements)."""
    n = max(1, torch.get_num_threads())
    return n if work is None else max(1, min(n, work // GRAIN))
