"""A decode step as a program: the C++ kernel calls of one Llama-family decode step (B rows, one new token each),
every pointer fixed, over buffers allocated once per generate() call. The CPU counterpart of replaying a CUDA graph.

Why: at the SmolLM2-135M shape (30 layers, hidden 576) a decode step on the direct path took ~52 ms on a 2-core
Zen 3, of which the kernels were ~33 ms and the Python and torch glue between them (~300 op calls: validation,
allocation, views, dispatch) ~19 ms. Here a step is ~300 pybind calls with prebuilt argument tuples.

    program = DecodeProgram.build(model, cache)      # None when the model or the moment does not allow it (why())
    logits = program(tok)                             # tok (B,) int64 -> (B, V), a buffer the next call overwrites

A step: x = embed[tok] (index_select into a buffer; ids out of range raise there), lens = seqlens + 1, then per
layer exactly the calls, arguments and thread counts of the model's direct path (so the logits are bit-identical
to model(tok[:, None], cache): tested):

    norm_fwd     h = rms_norm(x) (layer 0, r = x) or h, r = rms_norm(x + r), x + r     (r: two buffers in turn)
    gemm_heads   q, k, v = the heads of h @ Wqkv^T (+ b)                                 (B, H, 1, D)
    rope_fwd     q, k = rope(q, k) at positions seqlens (int32, read by the kernel each step)
    kv_write     k, v into the cache at seqlens
    attn_fwd     o = decode attention of q over the cache, lens = seqlens + 1 keys per row
    gemm         x = o @ Wo^T (+ b)                    (Int8Linear: the W8A16 / W8A8 calls of its forward)
    norm_fwd     h, r = rms_norm(x + r), x + r
    gemm, gemm   x = down(act(gate(h)) * up(h))        (one gated GEMM, then down)

then the final norm, the lm_head into the logits buffer and seqlens = lens.

Taken only where the direct path would run every op on its C++ kernel (CPU tensors of a kernel dtype, the cpp
backend chosen, nothing tracing or recording: no torch.compile, no fastllm.explain, no grad). Each step checks that
this still holds (else that step runs the model's forward) and that no weight changed since the build (version
counters; else generate rebuilds the program). Llama, Mistral and Qwen2 (fastllm.models.llama.Llama); other models
use their forward.
"""

import torch
from torch import nn

from fastllm import _backend, _ext
from fastllm._op import _direct_ok
from fastllm.nn.int8 import Int8Linear
from fastllm.ops import _pack
from fastllm.ops._common import KERNEL_DTYPES
from fastllm.ops.attention import _MASK_NONE, MAX_KERNEL_HEAD_DIM, _scale, attention_fwd
from fastllm.ops.gemm import _layout, act_ref, fused_gated_ffn_fwd, linear_fwd
from fastllm.ops.int8 import _w8a8_layout, int8_matmul_op, quantize_int8_op, w8a16_op
from fastllm.ops.layer_norm import STREAM_BYTES, _add_rms_norm, _rms_norm
from fastllm.ops.qkv import qkv_fwd
from fastllm.ops.rope import _rope

_OPS = (_rms_norm, _add_rms_norm, qkv_fwd, _rope, attention_fwd, linear_fwd, fused_gated_ffn_fwd, w8a16_op,
        int8_matmul_op, quantize_int8_op)  # fmt: skip


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


class DecodeProgram:
    def __init__(self):
        self.calls: list = []  # (C function, argument tuple)
        self.keep: list = []  # every buffer and packed weight a pointer in `calls` points into
        self.watch: list = []  # (tensor, its _version at build): weights whose change invalidates the program

    # ----------------------------------------------------------------------------------------------
    # eligibility

    @staticmethod
    def why_not(model, cache) -> str | None:
        """None when a program can run this model's decode steps now, else the reason."""
        from fastllm.models.llama import Llama

        if type(model) is not Llama:
            return f"{type(model).__name__} has no decode program (its forward runs)"
        if _ext.C is None or not hasattr(_ext.C, "kv_write"):
            return "the C++ extension is not loaded"
        if torch.is_grad_enabled():
            return "grad mode is on"
        if not _direct_ok(()):
            return "the direct path is off (compile, a dispatch mode, fastllm.explain)"
        w = model.embed_tokens.weight
        if not w.is_cpu or w.dtype not in KERNEL_DTYPES:
            return f"weights on {w.device} / {w.dtype} (the program runs CPU float32/bfloat16/float16 models)"
        c = model.config
        if c.head_dim > MAX_KERNEL_HEAD_DIM:
            return f"head_dim {c.head_dim} > {MAX_KERNEL_HEAD_DIM}"
        if cache.k[0].dtype != w.dtype or not cache.k[0].is_cpu:
            return "the cache is not in the model's dtype on the CPU"
        for op in _OPS:
            if op._kernel("cpu") is not op._kernels.get("cpp"):
                return f"{op.name} does not run its C++ kernel (backend {_backend.get_backend()!r})"
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if p.is_inference():
                return f"{name} is an inference tensor (no version counter: an in-place change could not be seen)"
        for name, p in model.named_parameters():  # (buffers: Int8Linear's float32 scales, the float32 rope tables)
            if p.dtype not in (w.dtype, torch.int8):
                return f"{name} is {p.dtype}, the model {w.dtype}"
        for name, m in model.named_modules():
            if isinstance(m, Int8Linear) and m.bias is not None and m.bias.dtype != w.dtype:
                return f"{name}.bias is {m.bias.dtype}, the model {w.dtype}"
            if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
                return f"{name} is a {type(m).__name__}"
        return None

    def allowed(self) -> bool:
        """Whether the direct path would still run every op of the step on its C++ kernel now."""
        if torch.is_grad_enabled() or not _direct_ok(()):
            return False
        return all(op._kernel("cpu") is op._kernels.get("cpp") for op in _OPS)

    def stale(self) -> bool:
        """Whether a weight changed (in place) since the build: its packed copy and pointers may be out of date."""
        return any(t._version != v for t, v in self.watch)

    # ----------------------------------------------------------------------------------------------
    # building: one method per kernel call, each the argument list of the direct path's call (ops/*.py)

    def _buf(self, *shape, dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)
        self.keep.append(t)
        return t

    def _weight(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is not None:
            self.watch.append((t, t._version))  # (why_not declined inference tensors: they have no version)
        return t

    def _norm(self, out, h, x, res, w, eps: float):
        """As ops/layer_norm.py's _lean (rms_norm / add_rms_norm on contiguous (M, n) rows)."""
        M, n = x.shape
        nbytes = out.nbytes * (2 if h is not None else 1)
        args = (out.data_ptr(), _ptr(h), x.data_ptr(), _ptr(res), _ptr(self._weight(w)), 0, M, n, n, n, eps, True,
                nbytes >= STREAM_BYTES, _ext.DTYPE_CODES[x.dtype], _ext.num_threads(M * n))  # fmt: skip
        self.calls.append((_ext.C.norm_fwd, args))

    def _gemm(self, a, w, out, **kw):
        """As ops/gemm.py's _linear_cpp / _gated_cpp (w: the weight, or (gate, up) for the gated epilogue)."""
        w, w2 = w if isinstance(w, tuple) else (w, None)
        pk = _pack.cached_weight(self._weight(w), self._weight(w2), _layout(w.dtype))
        self.keep.append(pk)
        self.calls.append((_ext.C.gemm, _pack.gemm_args(a, pk, out, **kw)))

    def _project(self, mod, a, out):
        """out = mod(a) for an nn.Linear or an Int8Linear, as its forward on the direct path."""
        if type(mod) is nn.Linear:
            self._gemm(a, mod.weight, out, bias=self._weight(mod.bias))
            return
        b = self._weight(mod.bias)
        w = self._weight(mod.weight)
        scale = self._weight(mod.weight_scale)
        if mod.mode == "w8a16":  # ops/int8.py _w8a16_cpp
            pk = _pack.cached_weight(w, None, "i8_rows")
            self.keep.append(pk)
            self.calls.append((_ext.C.gemm, _pack.gemm_args(a, pk, out, mode="scale", bias=b, b_scale=scale)))
            return
        M, K = a.shape  # W8A8: ops/int8.py _quant_cpp, then _mm_cpp
        q, s = self._buf(M, K, dtype=torch.int8), self._buf(M, dtype=torch.float32)
        self.calls.append((_ext.C.quantize_rows, (q.data_ptr(), s.data_ptr(), a.data_ptr(), M, K, a.stride(0),
                                                   _ext.DTYPE_CODES[a.dtype], _ext.num_threads(M * K))))  # fmt: skip
        pk = _pack.cached_weight(w, None, _w8a8_layout())
        self.keep.append(pk)
        self.calls.append((_ext.C.gemm, _pack.gemm_args(q, pk, out, mode="int8", bias=b, a_scale=s, b_scale=scale)))

    @classmethod
    def build(cls, model, cache) -> "DecodeProgram | None":
        if cls.why_not(model, cache) is not None:
            return None
        p = cls()
        c, B, dt = model.config, cache.batch_size, model.embed_tokens.weight.dtype
        d, Hq, Hkv, D = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        S_max, code = cache.max_seq_len, _ext.DTYPE_CODES[dt]
        p.cache, p.B, p.S_max = cache, B, S_max
        p.embed = p._weight(model.embed_tokens.weight)
        x, h = p._buf(B, d, dtype=dt), p._buf(B, d, dtype=dt)  # sublayer output, normed input
        r = (p._buf(B, d, dtype=dt), p._buf(B, d, dtype=dt))  # the residual stream, in turn
        q, k, v = p._buf(B, Hq, 1, D, dtype=dt), p._buf(B, Hkv, 1, D, dtype=dt), p._buf(B, Hkv, 1, D, dtype=dt)
        qr, kr = p._buf(B, Hq, 1, D, dtype=dt), p._buf(B, Hkv, 1, D, dtype=dt)
        o = p._buf(B, Hq, 1, D, dtype=dt)
        stats = p._buf(B, Hq, 1, 2, dtype=torch.float32)
        mid = p._buf(B, c.intermediate_size, dtype=dt)
        p.x_in, p.lens = r[0], p._buf(B, dtype=torch.int32)  # the embedding rows go straight into r[0]
        p.logits = p._buf(B, c.vocab_size, dtype=dt)
        seqlens = cache.seqlens
        cos, sin = model.rotary.cos, model.rotary.sin  # (P, R / 2) float32, contiguous
        o2 = o.view(B, Hq * D)
        cur = 0  # which r holds the residual stream
        for i, blk in enumerate(model.layers):
            n1, n2, attn = blk.input_layernorm, blk.post_attention_layernorm, blk.self_attn
            if i == 0:  # h = rms_norm(embeddings), the residual stream starts as the embeddings
                p._norm(h, None, r[cur], None, n1.weight, n1.eps)
            else:
                p._norm(h, r[1 - cur], x, r[cur], n1.weight, n1.eps)
                cur = 1 - cur
            pj = attn.qkv_proj
            if type(pj) is nn.Linear:  # ops/qkv.py _qkv_cpp
                pk = _pack.cached_weight(p._weight(pj.weight), None, _layout(dt))
                p.keep.append(pk)
                M, N = B, pj.weight.shape[0]
                bias = p._weight(pj.bias)
                p.calls.append((_ext.C.gemm_heads, (
                    M, d, h.data_ptr(), h.stride(0), h.stride(1), code, pk.buf.data_ptr(), pk.code,
                    _ext._CODES["layout"][pk.layout], _ptr(bias), q.data_ptr(), k.data_ptr(), v.data_ptr(), 1, D,
                    Hq, Hkv, code, _ext.num_threads(max(M * N * d // 16, N * d // 4)))))  # fmt: skip
                qi, ki, vi = q, k, v
            else:  # quantized: the module's output (B, (Hq + 2 Hkv) D), the heads by views (as nn/attention.py)
                qkv = p._buf(B, (Hq + 2 * Hkv) * D, dtype=dt)
                p._project(pj, h, qkv)
                qi, ki, vi = qkv.view(B, 1, Hq + 2 * Hkv, D).transpose(1, 2).split((Hq, Hkv, Hkv), dim=1)
            # ops/rope.py _fwd_cpp, positions = seqlens (B,) int32 as (B, 1)
            p.calls.append((_ext.C.rope_fwd, (
                qr.data_ptr(), kr.data_ptr(), qi.data_ptr(), ki.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                seqlens.data_ptr(), B, Hq, Hkv, 1, D, 2 * cos.shape[1], cos.shape[0], *qi.stride()[:3],
                *ki.stride()[:3], 1 if B > 1 else 0, 0, cos.stride(0), False, False, code,
                _ext.num_threads(qr.numel() + kr.numel()))))  # fmt: skip
            kc, vc = cache.k[i], cache.v[i]  # (B, Hkv, S_max, D)
            for dst, src in ((kc, kr), (vc, vi)):
                p.calls.append((_ext.C.kv_write, (
                    dst.data_ptr(), src.data_ptr(), seqlens.data_ptr(), B, Hkv, 1, D, S_max, dst.element_size(),
                    dst.stride(0), dst.stride(1), *src.stride()[:3])))  # fmt: skip
            # ops/attention.py _fwd_cpp, as decode_attention(q, kc, vc, lens)
            scale = _scale("decode_attention", attn.scale, D)
            p.calls.append((_ext.C.attn_fwd, (
                o.data_ptr(), stats.data_ptr(), qr.data_ptr(), kc.data_ptr(), vc.data_ptr(), B, Hq, Hkv, 1, S_max, D,
                qr.stride()[:3], kc.stride()[:3], vc.stride()[:3], 0, _MASK_NONE, (0, 0, 0, 0),
                p.lens.data_ptr(), True, True, scale, code,
                _ext.num_threads(B * Hq * 1 * S_max * D // 64))))  # fmt: skip
            p._project(attn.o_proj, o2, x)
            p._norm(h, r[1 - cur], x, r[cur], n2.weight, n2.eps)
            cur = 1 - cur
            g, u, dn = blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj
            if type(g) is nn.Linear and type(u) is nn.Linear and type(dn) is nn.Linear:
                p._gemm(h, (g.weight, u.weight), mid, mode="gated", act=blk.mlp.activation, bias=p._weight(g.bias),
                        bias2=p._weight(u.bias))  # fmt: skip
                p._gemm(mid, dn.weight, x, bias=p._weight(dn.bias))
            else:  # quantized (nn/attention.py GatedMLP): down(act(gate(h)) * up(h)) through the modules, the
                # activation product in torch as there
                gb, ub = p._buf(B, c.intermediate_size, dtype=dt), p._buf(B, c.intermediate_size, dtype=dt)
                p._project(g, h, gb)
                p._project(u, h, ub)
                act = blk.mlp.activation
                p.calls.append((lambda gb, ub, act=act: torch.mul(act_ref(act, gb), ub, out=mid), (gb, ub)))
                p._project(dn, mid, x)
        p._norm(h, r[1 - cur], x, r[cur], model.norm.weight, model.norm.eps)
        p._project(model.lm_head, h, p.logits)
        return p

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (B,) int64: one new token per row -> the next-token logits (B, V) (overwritten by the next call)."""
        torch.index_select(self.embed, 0, tok, out=self.x_in)
        seqlens = self.cache.seqlens
        torch.add(seqlens, 1, out=self.lens)
        for fn, args in self.calls:
            if fn(*args) is False:  # kv_write: a row is full (nothing of this step is kept)
                raise ValueError(f"cache: it is full ({self.S_max} tokens)")
        seqlens.copy_(self.lens)
        return self.logits
