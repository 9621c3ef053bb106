"""Loads the C++ extension fastllm._C once, or says why it is not there.

Without it (no compiler at install time, FASTLLM_NO_CPP=1, a stale build) fastllm still imports, warns
once, and CPU ops take the reference path.
"""

import importlib
import os
import warnings

import torch

ABI = 7  # must equal kAbi in kernels/cpp/bindings.cpp

# dtype codes shared with kernels/cpp/common.h (enum DType)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}


def _load():
    if os.environ.get("FASTLLM_NO_CPP", "0") == "1":
        return None, "disabled by FASTLLM_NO_CPP=1"
    try:
        _C = importlib.import_module("fastllm._C")
    except ModuleNotFoundError:
        return None, "fastllm._C is not built (installed with FASTLLM_NO_CPP=1 or without a C++ compiler)"
    except ImportError as e:
        return None, f"fastllm._C did not load ({e}); reinstall with `pip install .`"
    if getattr(_C, "ABI", None) != ABI:
        return None, f"fastllm._C is a stale build (ABI {getattr(_C, 'ABI', None)}, expected {ABI}); reinstall"
    return _C, f"loaded ({_C.isa()})"


C, STATUS = _load()
if C is None:
    warnings.warn(f"fastllm: C++ extension not available: {STATUS}. CPU ops use the reference path.", stacklevel=2)


# Elements of work per OpenMP thread below which a call does not fork (torch's own GRAIN_SIZE). A tiny
# op on 2 threads waits at the barrier for the slower thread; if another process holds that core, the
# wait is a scheduler time slice (milliseconds, measured here), so small calls stay on one thread.
GRAIN = 32768


def num_threads(work: int | None = None) -> int:
    """OpenMP threads for a kernel call: torch.get_num_threads(), fewer for small `work` (elements)."""
    n = max(1, torch.get_num_threads())
    return n if work is None else max(1, min(n, work // GRAIN))
