"""The equivalence criterion of fastllm (one for every op, output and gradient), for tests and benchmarks.

Reference = the op computed in float64. fastllm's result passes when

    max|fastllm - ref| <= 2 * max|torch_eager_same_dtype - ref| + floor,   floor = eps(dtype) * max(1, max|ref|)

(FlashAttention's test criterion; the floor is one unit in the last place at the output's scale, so a
case where eager happens to be exact does not demand more than exactness from us). NaN/Inf must sit
where the reference has them.
"""

import torch


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over the finite entries of ref (0.0 for empty tensors)."""
    if out.numel() == 0:
        return 0.0
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (out[finite] - ref[finite]).abs().max().item()


def floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = ref.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref.numel() else 0.0
    return torch.finfo(dtype).eps * max(1.0, scale)


def saved_activation_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves for the backward of fn(*args), beyond the tensors in args
    (each storage counted once): the activation memory a training step keeps per call."""
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        p = t.untyped_storage().data_ptr()
        if p not in inputs and p not in seen:
            seen.add(p)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def assert_equivalent(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Raise AssertionError, with the mismatch count and the first bad index, unless out meets the criterion."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if out.dtype != eager.dtype:
        raise AssertionError(f"{name}: dtype {out.dtype} != eager's {eager.dtype}")
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    bad_nan = torch.isnan(o) != torch.isnan(r)
    if bad_nan.any():
        idx = tuple(bad_nan.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: NaN pattern differs from the reference at {int(bad_nan.sum())} places, first {idx}"
        )
    finite = torch.isfinite(r)
    bad_inf = torch.isinf(r) & (o != r)
    if bad_inf.any():
        idx = tuple(bad_inf.nonzero()[0].tolist())
        raise AssertionError(f"{name}: reference is {r[idx].item()} at {idx}, got {o[idx].item():.6g}")
    tol = 2 * max_abs_err(eager, ref) + floor(out.dtype, ref)
    diff = torch.where(finite, (o - r).abs(), torch.zeros_like(o))
    bad = diff > tol
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {o.numel()} elements exceed 2*eager_err + floor = {tol:.3e} "
            f"(max err {diff.max().item():.3e}, eager err {max_abs_err(eager, ref):.3e}); first at {idx}: "
            f"got {o[idx].item():.6g}, reference {r[idx].item():.6g}"
        )
