"""Packed B operands for the C++ GEMM engine (kernels/cpp/gemm.h) and the cache of packed weights.

Weights are packed once into the engine's panel layout and the packed copy is cached, keyed by the weight's
data pointer, shape, strides, dtype and layout, and validated by the weight's version counter: an in-place
update (optimizer step, `copy_`, `add_` under no_grad) bumps the version and the next call repacks; the entry
is dropped when the weight is freed (a weak reference). Writes through `weight.data` do not bump the version
(a torch property of `.data`): call `clear_weight_cache()` after them. Inference tensors (created under
torch.inference_mode) have no version counter and are packed on every call.
"""

import warnings
import weakref

import torch

from fastllm import _ext
from fastllm.ops._common import ptr

# Layouts by name (enum Layout in gemm.h, codes from _ext.code("layout", name)): rows, pairs (bf16 k-pairs, the
# AVX512-BF16 kernel), i8_rows (W8A16), i16_pairs (W8A8, AVX2 and portable), i8_quads (W8A8, AVX512-VNNI).
_BUF_DTYPE = {"i8_rows": torch.int8, "i16_pairs": torch.int16, "i8_quads": torch.int8}


class Packed:
    __slots__ = ("K", "N", "__weakref__", "buf", "code", "colsum", "gated", "layout", "ptrs", "refs", "versions")

    def __init__(self, buf, code, K, N, gated, layout, colsum):
        self.buf, self.code, self.K, self.N, self.gated, self.layout = buf, code, K, N, gated, layout
        self.colsum = colsum


_cache: dict = {}
_by_id: dict = {}  # (id(w), id(w2), layout) -> the entry of _cache last packed for those objects


def clear_weight_cache() -> None:
    """Drop every cached packed weight (needed only after writes through `weight.data`, see the module doc)."""
    _cache.clear()
    _by_id.clear()


def pack(src, src2, K, N, s_k, s_n, layout: str) -> Packed:
    """B(k, n) = src[k * s_k + n * s_n] (K x N), and the gated interleave with src2, in `layout`."""
    code, lcode = _ext.DTYPE_CODES[src.dtype], _ext.code("layout", layout)
    pcode = _ext.C.pack_dtype(code)
    gated = src2 is not None
    dtype = _BUF_DTYPE.get(layout, torch.float32 if pcode == _ext.DTYPE_CODES[torch.float32] else torch.bfloat16)
    buf = torch.empty(_ext.C.packed_b_elems(K, N, gated, lcode), dtype=dtype)
    colsum = None
    if layout == "i8_quads":
        colsum = torch.zeros(_ext.C.packed_b_elems(1, N, gated, _ext.code("layout", "rows")), dtype=torch.int32)
    if buf.numel():
        _ext.C.pack_b(
            dst=buf.data_ptr(), src=src.data_ptr(), src2=ptr(src2), K=K, N=N, s_k=s_k, s_n=s_n, src_dt=code,
            layout=lcode, colsum=ptr(colsum), nthreads=_ext.num_threads(K * N),
        )  # fmt: skip
    return Packed(buf, pcode, K, N, gated, layout, colsum)


_warned_inference = False


def _warn_inference_weight() -> None:
    """Once per process: a weight that is an inference tensor is repacked on every call (measured: a SmolLM2-shaped
    decode step ~25% slower), which a user would otherwise only see as a slow model. Caching it by identity instead
    would serve a stale copy after an in-place write under inference_mode (load_state_dict into a model built
    there), so the cost stays and is said."""
    global _warned_inference
    if not _warned_inference:
        _warned_inference = True
        warnings.warn(
            "fastllm: a weight is an inference tensor (created under torch.inference_mode): without a version counter "
            "its packed copy cannot be cached, so it is repacked on every call. Create or load the model outside "
            "inference_mode (and run it inside) for the cached path.",
            stacklevel=4,
        )


def _key(w):
    return (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)


def cached_weight(w: torch.Tensor, w2: torch.Tensor | None, layout: str) -> Packed:
    """B(k, n) = w[n, k] (nn.Linear layout; the gated interleave with w2), packed; cached while unchanged."""
    fast_key = (id(w), id(w2), layout)
    hit = _by_id.get(fast_key)
    if hit is not None and hit.refs[0]() is w and (w2 is None or hit.refs[1]() is w2):
        # the per-call path of a decode step: the same Parameter objects every time (~0.5 us; the full key ~3 us)
        try:
            same = w._version == hit.versions[0] and w.data_ptr() == hit.ptrs[0] and w.shape == (hit.N, hit.K)
            if same and w2 is not None:
                same = w2._version == hit.versions[1] and w2.data_ptr() == hit.ptrs[1]
        except RuntimeError:  # (inference tensors have no version counter)
            same = False
        if same:
            return hit
    N, K = w.shape
    ws = (w,) if w2 is None else (w, w2)
    try:
        versions = tuple(t._version for t in ws)
    except RuntimeError:  # inference tensors have no version counter: never cache them
        _warn_inference_weight()
        return pack(w, w2, K, N, w.stride(1), w.stride(0), layout)
    key = (*(_key(t) for t in ws), layout)
    hit = _cache.get(key)
    if hit is not None:
        alive = [r() for r in hit.refs]
        same = all(t is not None and t.data_ptr() == p for t, p in zip(alive, hit.ptrs, strict=True))
        if same and hit.versions == versions:
            return hit
    packed = pack(w, w2, K, N, w.stride(1), w.stride(0), layout)
    entry = weakref.ref(packed)

    def _drop(_ref, key=key, fast_key=fast_key):
        if _cache.get(key) is entry():
            _cache.pop(key, None)
        if _by_id.get(fast_key) is entry():
            _by_id.pop(fast_key, None)

    packed.refs = tuple(weakref.ref(t, _drop) for t in ws)
    packed.versions = versions
    packed.ptrs = tuple(t.data_ptr() for t in ws)
    _cache[key] = packed
    _by_id[fast_key] = packed
    return packed


def pack_matrix(b: torch.Tensor, layout: str) -> Packed:
    """B (K, N) as given (any strides), packed for one call."""
    K, N = b.shape
    return pack(b, None, K, N, b.stride(0), b.stride(1), layout)


def gemm_args(a, pk: Packed, out, *, mode="plain", act="none", out2=None, bias=None, bias2=None, res=None,
              pre=None, pre2=None, aux=None, aux2=None, a_scale=None, b_scale=None) -> tuple:  # fmt: skip
    """The arguments of C.gemm (kernels/cpp/bindings.cpp), positional, in its order, for `gemm` below (and for a
    decode program, fastllm/models/_program.py, which keeps them and calls C.gemm with them every step)."""
    M, K = a.shape
    N = out.shape[1]
    c = _codes()
    return (
        M, N, K, a.data_ptr(), a.stride(0), a.stride(1), _ext.DTYPE_CODES[a.dtype],
        pk.buf.data_ptr(), pk.code, c["layout"][pk.layout], c["epilogue"][mode], c["activation"][act],
        out.data_ptr(), out.stride(0), ptr(out2), ptr(bias), ptr(bias2), ptr(res),
        res.stride(0) if res is not None else 0, ptr(pre), ptr(pre2),
        pre.stride(0) if pre is not None else 0, ptr(aux), ptr(aux2),
        aux.stride(0) if aux is not None else 0, _ext.DTYPE_CODES[out.dtype], ptr(a_scale), ptr(b_scale),
        ptr(pk.colsum),
        _ext.num_threads(max(M * N * K // 16, N * K // 4)),  # decode: the weight read is the work
    )  # fmt: skip


def gemm(a, pk: Packed, out, **kw) -> None:
    """out (M, N) = epilogue(a (M, K) @ B) on the C++ engine; tensors with unit column stride except a.

    kw: mode, the epilogue (gemm.h): plain, gated, dact, dgated, int8 (W8A8), scale (W8A16); act: none or an
    activation; out2, bias, bias2, res, pre, pre2, aux, aux2, a_scale, b_scale as gemm.h's Gemm.
    """
    # positional (gemm_args): kwargs parsing of 30 arguments in the binding costs ~3 us a call
    _ext.C.gemm(*gemm_args(a, pk, out, **kw))


def _codes():
    return _ext._CODES
