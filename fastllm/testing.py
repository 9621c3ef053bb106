"""The equivalence criterion of fastllm (one for every op, output and gradient), for tests and benchmarks.

Reference = the op computed in float64. Each output and each gradient is judged on its own (never the
largest error of several tensors against the largest tolerance). fastllm's result passes when

    max|fastllm - ref| <= 2 * max|torch_eager_same_dtype - ref| + floor,   floor = eps(dtype) * max(1, max|ref|)

(FlashAttention's test criterion; the floor is one unit in the last place at the output's scale, so a case
where eager happens to be exact does not demand more than exactness from us), and, for 16-bit outputs, also
norm-wise

    ||fastllm - ref|| / ||ref|| <= 2 * ||eager - ref|| / ||ref|| + eps(dtype) / 8

so that a 16-bit path cannot hide a systematic error under one large element of eager's (one rounding per
element gives a norm-wise error of about eps / 3.5; the eps / 8 floor lets a few isolated ulps through where
eager happens to be exact, not a bias on every element). Where that has no meaning (the reference is all zero,
as a gradient can be, or eager's own norm-wise error is >= 1) only the element-wise bound applies.

Non-finite values: NaN must sit exactly where the reference has NaN and +-Inf exactly where it has the same
infinity. If eager itself is NaN or Inf where the reference is finite, the criterion has no finite bar to
offer; that raises (`CriterionError`) instead of turning the tolerance into NaN/Inf, which would pass anything.
"""

import math
from dataclasses import dataclass

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class CriterionError(AssertionError):
    """The criterion cannot judge this case (e.g. eager is non-finite where the reference is finite)."""


@dataclass(frozen=True)
class Verdict:
    """One output judged against the float64 reference and eager's error."""

    name: str
    ok: bool
    max_err: float  # max |out - ref| over the entries where ref is finite
    tol: float  # 2 * eager's max error + floor
    eager_err: float
    rel_err: float | None  # ||out - ref|| / ||ref|| (16-bit outputs only)
    rel_tol: float | None
    message: str  # why it failed ("" when ok)

    def __str__(self) -> str:
        rel = f", rel {self.rel_err:.2e} <= {self.rel_tol:.2e}" if self.rel_err is not None else ""
        state = "ok" if self.ok else f"FAIL: {self.message}"
        return f"{self.name}: max err {self.max_err:.3e} (tol {self.tol:.3e}{rel}) {state}"


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over the entries where ref is finite (0.0 when there are none). NaN or Inf in `out`
    where ref is finite gives inf (never NaN, which every comparison would treat as False)."""
    if out.numel() == 0:
        return 0.0
    o, r = _f64(out), _f64(ref)
    return _max_err(o, r, torch.isfinite(r))


def _max_err(o: torch.Tensor, r: torch.Tensor, finite: torch.Tensor) -> float:
    d = torch.where(finite, (o - r).abs(), 0.0)  # no boolean indexing: it copies, slow on large tensors
    m = d.max().item() if d.numel() else 0.0
    return m if m < math.inf else math.inf  # NaN (out non-finite where ref is finite) -> inf


def floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = _f64(ref).abs().nan_to_num(0.0, 0.0, 0.0).max().item() if ref.numel() else 0.0
    return torch.finfo(dtype).eps * max(1.0, scale)


def _rel_err(o: torch.Tensor, r: torch.Tensor, finite: torch.Tensor) -> float:
    """||o - r|| / ||r|| over the finite entries of r (inf when r is all zero there)."""
    ref_norm = torch.where(finite, r, 0.0).norm().item()
    err_norm = torch.where(finite, o - r, 0.0).norm().item()
    return err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else math.inf)


def _first(mask: torch.Tensor) -> tuple:
    return tuple(mask.nonzero()[0].tolist())


def judge(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, name: str = "output") -> Verdict:
    """Judge one tensor. Raises CriterionError when the criterion cannot apply (see the module docstring);
    otherwise returns a Verdict whose `ok` says whether `out` passes."""
    if out.shape != ref.shape or eager.shape != ref.shape:
        raise CriterionError(
            f"{name}: shapes differ: out {tuple(out.shape)}, eager {tuple(eager.shape)}, reference {tuple(ref.shape)}"
        )
    if out.dtype != eager.dtype:
        raise CriterionError(f"{name}: dtype {out.dtype} != eager's {eager.dtype}")
    o, e, r = _f64(out), _f64(eager), _f64(ref)
    finite = torch.isfinite(r)
    eager_bad = ~torch.isfinite(e) & finite  # (isfinite is slow on float64: each mask is computed once)
    if eager_bad.any():
        idx = _first(eager_bad)
        raise CriterionError(
            f"{name}: eager is {e[idx].item()} where the reference is finite ({r[idx].item():.6g}) at "
            f"{int(eager_bad.sum())} places, first {idx}: the 2x-eager criterion has no finite bar here"
        )
    eager_err = _max_err(e, r, finite)
    tol = 2 * eager_err + floor(out.dtype, r)
    err = _max_err(o, r, finite)

    def verdict(ok: bool, message: str = "", rel=None, rel_tol=None) -> Verdict:
        return Verdict(name, ok, err, tol, eager_err, rel, rel_tol, message)

    bad_nan = torch.isnan(o) != torch.isnan(r)
    if bad_nan.any():
        idx = _first(bad_nan)
        return verdict(False, f"NaN pattern differs from the reference at {int(bad_nan.sum())} places, first {idx}: "
                              f"got {o[idx].item()}, reference {r[idx].item()}")  # fmt: skip
    bad_inf = torch.isinf(r) & (o != r)
    if bad_inf.any():
        idx = _first(bad_inf)
        return verdict(False, f"reference is {r[idx].item()} at {idx}, got {o[idx].item():.6g}")
    diff = torch.where(finite, (o - r).abs(), torch.zeros_like(r))
    bad = ~(diff <= tol)  # a NaN difference (out non-finite where ref is finite) counts as bad
    if bad.any():
        idx = _first(bad)
        return verdict(False, f"{int(bad.sum())} of {o.numel()} elements exceed 2*eager_err + floor = {tol:.3e} "
                              f"(max err {err:.3e}, eager err {eager_err:.3e}); first at {idx}: "
                              f"got {o[idx].item():.6g}, reference {r[idx].item():.6g}")  # fmt: skip
    if out.dtype in SIXTEEN_BIT and finite.any():
        rel, eager_rel = _rel_err(o, r, finite), _rel_err(e, r, finite)
        if not eager_rel < 1:  # a zero reference, or eager no closer than zeros: no relative scale to judge by
            return verdict(True)
        rel_tol = 2 * eager_rel + torch.finfo(out.dtype).eps / 8
        if not rel <= rel_tol:
            return verdict(False, f"norm-wise relative error {rel:.3e} > 2 * eager's {eager_rel:.3e} + eps/8 "
                                  f"= {rel_tol:.3e}", rel, rel_tol)  # fmt: skip
        return verdict(True, "", rel, rel_tol)
    return verdict(True)


def judge_all(outs, eagers, refs, names=None) -> list[Verdict]:
    """One Verdict per output (outputs, eager outputs and references as equal-length sequences)."""
    outs, eagers, refs = list(outs), list(eagers), list(refs)
    if not len(outs) == len(eagers) == len(refs):
        raise CriterionError(f"{len(outs)} outputs, {len(eagers)} eager outputs, {len(refs)} references")
    names = list(names) if names is not None else [f"output {i}" for i in range(len(outs))]
    return [judge(o, e, r, n) for o, e, r, n in zip(outs, eagers, refs, names, strict=True)]


def assert_equivalent(out: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Raise AssertionError, with the mismatch count and the first bad index, unless out meets the criterion."""
    v = judge(out, eager, ref, name)
    if not v.ok:
        raise AssertionError(f"{name}: {v.message}")


def assert_same_nonfinite(out: torch.Tensor, eager: torch.Tensor, name: str = "output", exact: bool = True) -> None:
    """NaN and +-Inf of `out` sit where eager's are (exact=True: NaN where NaN, +inf where +inf, -inf where
    -inf; exact=False: only finite vs non-finite, for quantized ops whose inf may turn into NaN)."""
    if out.shape != eager.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != eager's {tuple(eager.shape)}")
    o, e = _f64(out), _f64(eager)
    if exact:
        pairs = (("NaN", torch.isnan(o), torch.isnan(e)), ("+inf", torch.isposinf(o), torch.isposinf(e)),
                 ("-inf", torch.isneginf(o), torch.isneginf(e)))  # fmt: skip
    else:
        pairs = (("non-finite", ~torch.isfinite(o), ~torch.isfinite(e)),)
    for what, got, want in pairs:
        diff = got != want
        if diff.any():
            idx = _first(diff)
            raise AssertionError(
                f"{name}: {what} pattern differs from eager's at {int(diff.sum())} of {o.numel()} places "
                f"(eager has {int(want.sum())}, fastllm {int(got.sum())}); first at {idx}: "
                f"got {o[idx].item()}, eager {e[idx].item()}"
            )


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


def import_torchvision() -> str:
    """Import torchvision for the tests and benchmarks of timm / open_clip models; returns "absent", "ok" or
    "without compiled ops".

    PyPI's torchvision wheel for Linux x86-64 is a CUDA build: beside a CPU torch its compiled ops (_C.so: NMS,
    RoIAlign, deformable convolution; it links libtorch_cuda) do not load, and its import then fails while
    registering their meta kernels ("operator torchvision::nms does not exist"), which also breaks every transformers
    model (transformers imports torchvision when it is installed). The Python part, which is all that timm's and
    open_clip's Vision Transformers use (transforms, constants), is fine. This imports it without the meta
    registrations of the ops that did not load: the real torchvision, its detection ops unavailable (calling one
    raises torch's "no such operator"). Nothing is patched when torchvision imports normally (a CPU build, or a
    CUDA torch). Call it before anything imports transformers, timm or open_clip (tests/conftest.py and
    benchmarks/conftest.py do)."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("torchvision") is None:
        return "absent"
    try:
        import torchvision

        return "ok"
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401

    return "without compiled ops"
