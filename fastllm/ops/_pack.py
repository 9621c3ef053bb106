"""Packed B operands for the C++ GEMM engine (kernels/cpp/gemm.h) and the cache of packed weights.

Weights are packed once into the engine's panel layout and the packed copy is cached, keyed by the weight's
data pointer, shape, strides, dtype and layout, and validated by the weight's version counter: an in-place
update (optimizer step, `copy_`, `add_` under no_grad) bumps the version and the next call repacks; the entry
is dropped when the weight is freed (a weak reference). Writes through `weight.data` do not bump the version
(a torch property of `.data`): call `clear_weight_cache()` after them. Inference tensors (created under
torch.inference_mode) have no version counter and are packed on every call.
"""

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


def clear_weight_cache() -> None:
    """Drop every cached packed weight (needed only after writes through `weight.data`, see the module doc)."""
    _cache.clear()


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


def _key(w):
    return (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype)


def cached_weight(w: torch.Tensor, w2: torch.Tensor | None, layout: str) -> Packed:
    """B(k, n) = w[n, k] (nn.Linear layout; the gated interleave with w2), packed; cached while unchanged."""
    N, K = w.shape
    ws = (w,) if w2 is None else (w, w2)
    try:
        versions = tuple(t._version for t in ws)
    except RuntimeError:  # inference tensors have no version counter: never cache them
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

    def _drop(_ref, key=key):
        if _cache.get(key) is entry():
            _cache.pop(key, None)

    packed.refs = tuple(weakref.ref(t, _drop) for t in ws)
    packed.versions = versions
    packed.ptrs = tuple(t.data_ptr() for t in ws)
    _cache[key] = packed
    return packed


def pack_matrix(b: torch.Tensor, layout: str) -> Packed:
    """B (K, N) as given (any strides), packed for one call."""
    K, N = b.shape
    return pack(b, None, K, N, b.stride(0), b.stride(1), layout)


def gemm(a, pk: Packed, out, *, mode="plain", act="none", out2=None, bias=None, bias2=None, res=None, pre=None,
         pre2=None, aux=None, aux2=None, a_scale=None, b_scale=None) -> None:  # fmt: skip
    """out (M, N) = epilogue(a (M, K) @ B) on the C++ engine; tensors with unit column stride except a.

    mode: the epilogue (gemm.h): plain, gated, dact, dgated, int8 (W8A8), scale (W8A16); act: none or an activation.
    """
    M, K = a.shape
    N = out.shape[1]
    _ext.C.gemm(
        M=M, N=N, K=K, a=a.data_ptr(), a_rs=a.stride(0), a_cs=a.stride(1), a_dt=_ext.DTYPE_CODES[a.dtype],
        b=pk.buf.data_ptr(), b_dt=pk.code, b_layout=_ext.code("layout", pk.layout),
        mode=_ext.code("epilogue", mode), act=_ext.code("activation", act),
        c=out.data_ptr(), ldc=out.stride(0), c2=ptr(out2), bias=ptr(bias), bias2=ptr(bias2), res=ptr(res),
        ld_res=res.stride(0) if res is not None else 0, pre=ptr(pre), pre2=ptr(pre2),
        ld_pre=pre.stride(0) if pre is not None else 0, aux=ptr(aux), aux2=ptr(aux2),
        ld_aux=aux.stride(0) if aux is not None else 0, c_dt=_ext.DTYPE_CODES[out.dtype], a_scale=ptr(a_scale),
        b_scale=ptr(b_scale), b_colsum=ptr(pk.colsum),
        nthreads=_ext.num_threads(max(M * N * K // 16, N * K // 4)),  # decode: the weight read is the work
    )  # fmt: skip
