"""Validation and layout helpers shared by the ops. Errors name the op, the argument and what is accepted."""

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, arg: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        what = "a tensor or None" if optional else "a tensor"
        raise TypeError(f"{op}: {arg} must be {what}, got {type(t).__name__}")


def check_float(op: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} must be a floating tensor ({_dtype_names(FLOAT_DTYPES)}), got {t.dtype}")


def check_like(op: str, arg: str, t: torch.Tensor, ref_arg: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype and device (no silent casts or copies across devices)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {arg} has dtype {t.dtype} but {ref_arg} has {ref.dtype}; pass tensors of one dtype")
    if t.device != ref.device:
        raise ValueError(f"{op}: {arg} is on {t.device} but {ref_arg} is on {ref.device}; move them to one device")


def check_number(op: str, arg: str, v, *, minimum: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {arg} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or (minimum is not None and v < minimum):
        raise ValueError(f"{op}: {arg} must be a number >= {minimum}, got {v}")
    return v


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) -> (M, n) with unit column stride; a view when the layout allows, else a contiguous copy."""
    t2 = t.reshape(t.numel() // n if n else math.prod(t.shape[:-1]), n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
