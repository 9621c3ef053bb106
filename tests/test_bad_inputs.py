"""Every bad input counted (issue 15, item 7): one table of every public function of fastllm x bad-input class.

Classes: dtype, device (a meta tensor; a CUDA one where CUDA exists), rank, shape, heads (mismatched or zero), nonfinite
(NaN / Inf), zero_size, non_tensor (and other wrong Python types), ids (integer ids or positions out of range), path
(from_pretrained: pickle files, shards outside the model directory), value (a scalar argument out of its range).

A refused input must raise ValueError or TypeError whose message names the argument (each case gives the text it
expects, which holds the argument's name). NaN / Inf and zero-size inputs are not errors: they give the documented
result, which is torch's eager op's (NaN / Inf where eager has them, the values elsewhere judged by the float64
criterion of fastllm.testing; an empty input gives the empty result of eager's shape), or for ops torch lacks
(rotary_embedding, the int8 ops) the reference's beside the op.

The bad-input tables already written beside the ops (test_rope, test_layer_norm, test_attention_ops) are imported
and run here too, so that this module is the one place that counts them; the rows below are the classes those tables
do not cover. NaN / Inf per backend and per input is test_nonfinite.py / test_attention_nonfinite.py's subject: one
case per op here. `test_count` prints the count (per class).
"""

import functools
import json
import os
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import test_attention_ops
import test_layer_norm
import test_rope
import torch
import torch.nn.functional as F
from attention_common import decode_torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastllm
from fastllm.ops.int8 import int8_matmul_ref, quantize_ref, w8a16_ref
from fastllm.ops.rope import rope_ref, rope_tables
from fastllm.testing import assert_equivalent, assert_same_nonfinite

OTHER = "cuda" if torch.cuda.is_available() else "meta"  # the wrong device for CPU operands
NAN, INF = float("nan"), float("inf")
I32 = torch.int32

_gen = torch.Generator().manual_seed(15)


def rn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen).to(dtype)


def poke(t: torch.Tensor, value: float, *index) -> torch.Tensor:
    """A copy of t with t[index] = value."""
    t = t.clone()
    t[index] = value
    return t


def q8(*shape) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=_gen, dtype=torch.int8)


@dataclass(frozen=True)
class Case:
    """fn: the public function; kind: the bad-input class; name: what is wrong.
    A refusal: call() must raise `exc` with `match` in its message. A documented result: exc is None, and
    fast(*args) is compared with eager(*args) (and eager on float64 copies of args, the reference)."""

    fn: str
    kind: str
    name: str
    call: Callable[[], Any] | None = None
    exc: type | None = None
    match: str = ""
    args: tuple = ()
    fast: Callable | None = None
    eager: Callable | None = None
    bug: str = ""  # a known bug outside this helper's files: the case is a strict xfail saying where and what

    @property
    def id(self) -> str:
        return f"{self.fn}-{self.kind}-{self.name}"


def bad(fn, kind, name, call, exc, match, bug: str = "") -> Case:
    return Case(fn, kind, name, call=call, exc=exc, match=match, bug=bug)


def result(fn, kind, name, args, fast, eager) -> Case:
    return Case(fn, kind, name, args=tuple(args), fast=fast, eager=eager)


# ---------------------------------------------------------------------------------------------- tiny models


@functools.cache
def _llama_hf():
    """A 1-layer transformers Llama (vocab 64, GQA 4 / 2)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@functools.cache
def _llama():
    """The zoo's decoder (fastllm.models.Llama) built from it."""
    return fastllm.models.from_hf(_llama_hf())


def _ids(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _forward(model, ids):
    with torch.inference_mode():
        return model(ids)


# ---------------------------------------------------------------------------------------------- the table

X, W, Bv, R = rn(4, 8), rn(8), rn(8), rn(4, 8)  # norms: x (4, 8), weight / bias (8,), residual
LX, LW, LB = rn(3, 8), rn(6, 8), rn(6)  # linear: x (3, 8), weight (6, 8), bias (6,)
W1, W2 = rn(12, 8), rn(8, 12)  # fused_ffn
WG, WU, WD = rn(12, 8), rn(12, 8), rn(8, 12)  # fused_gated_ffn
AQ, AK, AV = rn(2, 4, 3, 8), rn(2, 2, 5, 8), rn(2, 2, 5, 8)  # attention (B, H, S, D), GQA 4 / 2
KC, VC = rn(2, 2, 6, 8), rn(2, 2, 6, 8)  # decode: cache S_max 6
LENS = torch.tensor([6, 4], dtype=I32)
QX, QW, QWS = rn(3, 16), q8(5, 16), rn(5).abs() + 0.01  # int8 ops
QA, QAS = q8(3, 16), rn(3).abs() + 0.01
PX, PW, PB = rn(2, 3, 16), rn(32, 16), rn(32)  # qkv_projection: hidden 16, Hq 2, Hkv 1, head_dim 8
RQ, RK = rn(2, 4, 5, 16), rn(2, 2, 5, 16)  # rotary_embedding
COS, SIN = rope_tables(9, 16)
POS = torch.arange(5).expand(2, 5).contiguous()


def _ffn(x, w1, w2):
    return F.linear(F.gelu(F.linear(x, w1)), w2)


def _gated(x, wg, wu, wd):
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _sdpa(q, k, v, **kw):
    """torch's eager SDPA: the math kernel (the CPU flash kernel returns zeros for a query row holding a NaN,
    test_attention_nonfinite.py's docstring)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


def _qkv_eager(x, w, b):
    y = F.linear(x, w, b)  # (B, S, (2 + 2) * 8)
    B, S, _ = x.shape
    q, k, v = y.split([16, 8, 8], dim=-1)
    return tuple(t.reshape(B, S, h, 8).transpose(1, 2) for t, h in ((q, 2), (k, 1), (v, 1)))


CASES: list[Case] = [
    # -------------------------------------------------------------- norms (test_layer_norm.BAD has the others)
    bad("layer_norm", "device", "bias meta", lambda: fastllm.layer_norm(X, W, Bv.to(OTHER)), ValueError, "bias is on"),
    bad("layer_norm", "shape", "x last dim", lambda: fastllm.layer_norm(rn(4, 7), W, Bv), ValueError, "weight must have shape (7,)"),
    bad("rms_norm", "dtype", "x int", lambda: fastllm.rms_norm(X.int(), None), TypeError, "x must be a floating"),
    bad("rms_norm", "non_tensor", "x list", lambda: fastllm.rms_norm(X.tolist(), W), TypeError, "x must be a tensor"),
    bad("rms_norm", "rank", "x 0-dim", lambda: fastllm.rms_norm(torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
    bad("rms_norm", "device", "weight meta", lambda: fastllm.rms_norm(X, W.to(OTHER)), ValueError, "weight is on"),
    bad("rms_norm", "value", "eps nan", lambda: fastllm.rms_norm(X, W, eps=NAN), ValueError, "eps must be >= 0"),
    bad("add_layer_norm", "non_tensor", "residual None", lambda: fastllm.add_layer_norm(X, None, W, Bv), TypeError, "residual must be a tensor"),
    bad("add_rms_norm", "non_tensor", "residual None", lambda: fastllm.add_rms_norm(X, None, W), TypeError, "residual must be a tensor"),
    bad("add_layer_norm", "device", "residual meta", lambda: fastllm.add_layer_norm(X, R.to(OTHER), W, Bv), ValueError, "residual is on"),
    bad("add_layer_norm", "rank", "residual 1-D", lambda: fastllm.add_layer_norm(X, R[0], W, Bv), ValueError, "residual must have"),
    bad("add_rms_norm", "dtype", "weight float64", lambda: fastllm.add_rms_norm(X, R, W.double()), TypeError, "weight has dtype"),
    bad("add_rms_norm", "shape", "residual shape", lambda: fastllm.add_rms_norm(X, rn(4, 9), W), ValueError, "residual must have"),
    bad("add_rms_norm", "non_tensor", "residual list", lambda: fastllm.add_rms_norm(X, R.tolist(), W), TypeError, "residual must be a tensor"),
    result("layer_norm", "nonfinite", "nan in x", [poke(X, NAN, 1, 2), W, Bv], fastllm.layer_norm, lambda x, w, b: F.layer_norm(x, (8,), w, b)),
    result("layer_norm", "nonfinite", "inf in weight", [X, poke(W, INF, 3), Bv], fastllm.layer_norm, lambda x, w, b: F.layer_norm(x, (8,), w, b)),
    result("layer_norm", "zero_size", "0 rows", [rn(0, 8), W, Bv], fastllm.layer_norm, lambda x, w, b: F.layer_norm(x, (8,), w, b)),
    result("rms_norm", "nonfinite", "inf in x", [poke(X, -INF, 0, 0), W], fastllm.rms_norm, lambda x, w: F.rms_norm(x, (8,), w, 1e-6)),
    result("rms_norm", "zero_size", "0 rows", [rn(2, 0, 8), W], fastllm.rms_norm, lambda x, w: F.rms_norm(x, (8,), w, 1e-6)),
    result("add_layer_norm", "nonfinite", "nan in residual", [X, poke(R, NAN, 2, 2), W, Bv], fastllm.add_layer_norm,
           lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b), x + r)),
    result("add_layer_norm", "zero_size", "0 rows", [rn(0, 8), rn(0, 8), W, Bv], fastllm.add_layer_norm,
           lambda x, r, w, b: (F.layer_norm(x + r, (8,), w, b), x + r)),
    result("add_rms_norm", "nonfinite", "inf in x", [poke(X, INF, 3, 7), R, W], fastllm.add_rms_norm,
           lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)),
    result("add_rms_norm", "zero_size", "0 rows", [rn(0, 8), rn(0, 8), W], fastllm.add_rms_norm,
           lambda x, r, w: (F.rms_norm(x + r, (8,), w, 1e-6), x + r)),
    # -------------------------------------------------------------- linear, fused_ffn, fused_gated_ffn
    bad("linear", "dtype", "x int", lambda: fastllm.linear(LX.int(), LW.int()), TypeError, "x must be a floating"),
    bad("linear", "dtype", "weight float64", lambda: fastllm.linear(LX, LW.double()), TypeError, "weight has dtype"),
    bad("linear", "dtype", "bias bf16", lambda: fastllm.linear(LX, LW, LB.bfloat16()), TypeError, "bias has dtype"),
    bad("linear", "device", "weight meta", lambda: fastllm.linear(LX, LW.to(OTHER)), ValueError, "weight is on"),
    bad("linear", "device", "bias meta", lambda: fastllm.linear(LX, LW, LB.to(OTHER)), ValueError, "bias is on"),
    bad("linear", "rank", "weight 1-D", lambda: fastllm.linear(LX, LW[0]), ValueError, "weight must be 2-D"),
    bad("linear", "rank", "x 0-dim", lambda: fastllm.linear(torch.tensor(1.0), LW), ValueError, "x must"),
    bad("linear", "shape", "in_features", lambda: fastllm.linear(rn(3, 9), LW), ValueError, "in_features"),
    bad("linear", "shape", "bias", lambda: fastllm.linear(LX, LW, rn(5)), ValueError, "bias must have shape (6,)"),
    bad("linear", "shape", "residual", lambda: fastllm.linear(LX, LW, residual=rn(3, 5)), ValueError, "residual must have shape"),
    bad("linear", "non_tensor", "x list", lambda: fastllm.linear(LX.tolist(), LW), TypeError, "x must be a tensor"),
    bad("linear", "non_tensor", "weight None", lambda: fastllm.linear(LX, None), TypeError, "weight must be a tensor"),
    bad("linear", "non_tensor", "bias float", lambda: fastllm.linear(LX, LW, 1.0), TypeError, "bias must be a tensor"),
    bad("linear", "non_tensor", "residual float", lambda: fastllm.linear(LX, LW, residual=1.0), TypeError, "residual must be a tensor"),
    bad("linear", "value", "activation", lambda: fastllm.linear(LX, LW, activation="tanh"), ValueError, "activation"),
    bad("fused_ffn", "dtype", "w2 float16", lambda: fastllm.fused_ffn(LX, W1, W2.half()), TypeError, "w2 has dtype"),
    bad("fused_ffn", "device", "w1 meta", lambda: fastllm.fused_ffn(LX, W1.to(OTHER), W2), ValueError, "w1 is on"),
    bad("fused_ffn", "rank", "w2 3-D", lambda: fastllm.fused_ffn(LX, W1, W2[None]), ValueError, "w2 must be 2-D"),
    bad("fused_ffn", "shape", "chain", lambda: fastllm.fused_ffn(LX, W1, rn(8, 11)), ValueError, "w1 and w2 do not chain"),
    bad("fused_ffn", "shape", "b1", lambda: fastllm.fused_ffn(LX, W1, W2, b1=rn(8)), ValueError, "b1 must have shape (12,)"),
    bad("fused_ffn", "non_tensor", "w2 None", lambda: fastllm.fused_ffn(LX, W1, None), TypeError, "w2 must be a tensor"),
    bad("fused_ffn", "non_tensor", "b1 float", lambda: fastllm.fused_ffn(LX, W1, W2, b1=1.0), TypeError, "b1 must be a tensor"),
    bad("fused_gated_ffn", "dtype", "w_up bf16", lambda: fastllm.fused_gated_ffn(LX, WG, WU.bfloat16(), WD), TypeError, "w_up has dtype"),
    bad("fused_gated_ffn", "device", "w_down meta", lambda: fastllm.fused_gated_ffn(LX, WG, WU, WD.to(OTHER)), ValueError, "w_down is on"),
    bad("fused_gated_ffn", "rank", "w_gate 1-D", lambda: fastllm.fused_gated_ffn(LX, WG[0], WU, WD), ValueError, "w_gate"),
    bad("fused_gated_ffn", "shape", "w_up", lambda: fastllm.fused_gated_ffn(LX, WG, rn(13, 8), WD), ValueError, "w_gate and w_up must have one shape"),
    bad("fused_gated_ffn", "shape", "b_down", lambda: fastllm.fused_gated_ffn(LX, WG, WU, WD, b_down=rn(3)), ValueError, "b_down must have shape (8,)"),
    bad("fused_gated_ffn", "non_tensor", "w_gate str", lambda: fastllm.fused_gated_ffn(LX, "w", WU, WD), TypeError, "w_gate must be a tensor"),
    bad("fused_gated_ffn", "non_tensor", "b_gate float", lambda: fastllm.fused_gated_ffn(LX, WG, WU, WD, b_gate=1.0), TypeError, "b_gate must be a tensor"),
    result("linear", "nonfinite", "nan in x", [poke(LX, NAN, 1, 1), LW, LB], fastllm.linear, F.linear),
    result("linear", "nonfinite", "inf in weight", [LX, poke(LW, INF, 2, 3), LB], fastllm.linear, F.linear),
    result("linear", "zero_size", "0 rows", [rn(0, 8), LW, LB], fastllm.linear, F.linear),
    result("linear", "zero_size", "0 in_features", [rn(3, 0), rn(6, 0), LB], fastllm.linear, F.linear),
    result("linear", "zero_size", "0 out_features", [LX, rn(0, 8), rn(0)], fastllm.linear, F.linear),
    result("fused_ffn", "nonfinite", "nan in w1", [LX, poke(W1, NAN, 4, 4), W2], fastllm.fused_ffn, _ffn),
    result("fused_ffn", "zero_size", "0 rows", [rn(0, 8), W1, W2], fastllm.fused_ffn, _ffn),
    result("fused_gated_ffn", "nonfinite", "inf in x", [poke(LX, INF, 0, 5), WG, WU, WD], fastllm.fused_gated_ffn, _gated),
    result("fused_gated_ffn", "zero_size", "0 rows", [rn(2, 0, 8), WG, WU, WD], fastllm.fused_gated_ffn, _gated),
    # -------------------------------------------------------------- attention (test_attention_ops.BAD has the others)
    bad("flash_attention", "heads", "q 0 heads", lambda: fastllm.flash_attention(rn(2, 0, 3, 8), AK, AV), ValueError, "q has 0 heads"),
    bad("flash_attention", "heads", "k/v 0 heads", lambda: fastllm.flash_attention(AQ, rn(2, 0, 5, 8), rn(2, 0, 5, 8)), ValueError, "k/v have 0 heads"),
    bad("flash_attention", "heads", "q and k/v 0 heads", lambda: fastllm.flash_attention(rn(2, 0, 3, 8), rn(2, 0, 5, 8), rn(2, 0, 5, 8)), ValueError, "q has 0 heads"),
    bad("flash_attention", "dtype", "v float64", lambda: fastllm.flash_attention(AQ, AK, AV.double()), TypeError, "v has dtype"),
    bad("flash_attention", "device", "q meta", lambda: fastllm.flash_attention(AQ.to(OTHER), AK, AV), ValueError, "k is on"),
    bad("flash_attention", "non_tensor", "q None", lambda: fastllm.flash_attention(None, AK, AV), TypeError, "q must be a tensor"),
    bad("scaled_dot_product_attention", "heads", "no enable_gqa", lambda: fastllm.scaled_dot_product_attention(AQ, AK, AV), ValueError, "query has 4 heads but key/value have 2"),
    bad("scaled_dot_product_attention", "heads", "query 0 heads", lambda: fastllm.scaled_dot_product_attention(rn(2, 0, 3, 8), AK, AV, enable_gqa=True), ValueError, "query has 0 heads"),
    bad("scaled_dot_product_attention", "heads", "Hq % Hkv", lambda: fastllm.scaled_dot_product_attention(AQ, rn(2, 3, 5, 8), rn(2, 3, 5, 8), enable_gqa=True), ValueError, "multiple of key/value heads"),
    bad("scaled_dot_product_attention", "dtype", "mask int", lambda: fastllm.scaled_dot_product_attention(AQ, AK, AV, torch.ones(3, 5, dtype=I32), enable_gqa=True), TypeError, "attn_mask must be bool"),
    bad("scaled_dot_product_attention", "device", "value meta", lambda: fastllm.scaled_dot_product_attention(AQ, AK, AV.to(OTHER), enable_gqa=True), ValueError, "value is on"),
    bad("scaled_dot_product_attention", "shape", "key/value seq", lambda: fastllm.scaled_dot_product_attention(AQ, AK, rn(2, 2, 4, 8), enable_gqa=True), ValueError, "key and value must agree"),
    bad("scaled_dot_product_attention", "non_tensor", "key list", lambda: fastllm.scaled_dot_product_attention(AQ, AK.tolist(), AV), TypeError, "key must be a tensor"),
    bad("scaled_dot_product_attention", "value", "dropout_p", lambda: fastllm.scaled_dot_product_attention(AQ, AK, AV, dropout_p=2.0), ValueError, "dropout_p"),
    bad("scaled_dot_product_attention", "value", "causal with mask", lambda: fastllm.scaled_dot_product_attention(AQ, AK, AV, torch.ones(3, 5, dtype=torch.bool), is_causal=True), ValueError, "is_causal"),
    bad("decode_attention", "ids", "seqlens < new tokens", lambda: fastllm.decode_attention(AQ, KC, VC, torch.tensor([6, 2], dtype=I32)), ValueError, "cache_seqlens must count the 3 new tokens"),
    bad("decode_attention", "ids", "seqlens 1 < 3 new", lambda: fastllm.decode_attention(AQ, KC, VC, torch.tensor([1, 1], dtype=I32)), ValueError, "got [1]"),
    bad("decode_attention", "heads", "k_cache 0 heads", lambda: fastllm.decode_attention(AQ, rn(2, 0, 6, 8), rn(2, 0, 6, 8), LENS), ValueError, "k_cache/v_cache have 0 heads"),
    bad("decode_attention", "heads", "Hq % Hkv", lambda: fastllm.decode_attention(AQ, rn(2, 3, 6, 8), rn(2, 3, 6, 8), LENS), ValueError, "multiple of key/value heads"),
    bad("decode_attention", "dtype", "v_cache bf16", lambda: fastllm.decode_attention(AQ, KC, VC.bfloat16(), LENS), TypeError, "v_cache has dtype"),
    bad("decode_attention", "device", "k_cache meta", lambda: fastllm.decode_attention(AQ, KC.to(OTHER), VC.to(OTHER), LENS), ValueError, "k_cache is on"),
    bad("decode_attention", "shape", "v_cache seq", lambda: fastllm.decode_attention(AQ, KC, VC[:, :, :5], LENS), ValueError, "k_cache and v_cache must agree"),
    bad("decode_attention", "non_tensor", "q list", lambda: fastllm.decode_attention(AQ.tolist(), KC, VC, LENS), TypeError, "q must be a tensor"),
    result("flash_attention", "nonfinite", "nan in k", [AQ, poke(AK, NAN, 1, 0, 2, 3), AV], fastllm.flash_attention, _sdpa),
    result("flash_attention", "nonfinite", "inf in v", [AQ, AK, poke(AV, INF, 0, 1, 4, 0)], fastllm.flash_attention, _sdpa),
    result("flash_attention", "zero_size", "0 queries", [rn(2, 4, 0, 8), AK, AV], fastllm.flash_attention, _sdpa),
    result("flash_attention", "zero_size", "0 batch", [rn(0, 4, 3, 8), rn(0, 2, 5, 8), rn(0, 2, 5, 8)], fastllm.flash_attention, _sdpa),
    result("scaled_dot_product_attention", "nonfinite", "nan in query", [poke(AQ, NAN, 0, 3, 1, 1), AK, AV],
           lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, enable_gqa=True), _sdpa),
    result("scaled_dot_product_attention", "zero_size", "0 queries", [rn(2, 4, 0, 8), AK, AV],
           lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, enable_gqa=True), _sdpa),
    result("decode_attention", "nonfinite", "nan in q", [poke(AQ, NAN, 1, 2, 0, 0), KC, VC, LENS],
           fastllm.decode_attention, decode_torch),
    result("decode_attention", "nonfinite", "nan past seqlens (never read)", [AQ, poke(KC, NAN, 1, 0, 5, 0), poke(VC, NAN, 1, 1, 4, 2), LENS],
           fastllm.decode_attention, decode_torch),
    result("decode_attention", "zero_size", "0 batch", [rn(0, 4, 3, 8), rn(0, 2, 6, 8), rn(0, 2, 6, 8), torch.zeros(0, dtype=I32)],
           fastllm.decode_attention, decode_torch),
    result("decode_attention", "zero_size", "seqlens 0 (documented: zeros)", [AQ, KC, VC, torch.tensor([0, 6], dtype=I32)],
           fastllm.decode_attention, decode_torch),
    # -------------------------------------------------------------- int8
    bad("quantize_int8", "dtype", "x int8", lambda: fastllm.quantize_int8(QA), TypeError, "x must be a floating"),
    bad("quantize_int8", "non_tensor", "x list", lambda: fastllm.quantize_int8([1.0, 2.0]), TypeError, "x must be a tensor"),
    bad("quantize_int8", "rank", "x 0-dim", lambda: fastllm.quantize_int8(torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
    bad("quantize_int8", "value", "dim float", lambda: fastllm.quantize_int8(QX, 1.0), TypeError, "dim must be an int"),
    bad("quantize_int8", "value", "dim -3", lambda: fastllm.quantize_int8(QX, -3), ValueError, "dim -3 is out of range"),
    bad("int8_matmul", "rank", "a_q 0-dim", lambda: fastllm.int8_matmul(torch.tensor(1, dtype=torch.int8), QW, QAS, QWS), ValueError, "a_q must have at least 1 dim"),
    bad("int8_matmul", "rank", "b_q 1-D", lambda: fastllm.int8_matmul(QA, QW[0], QAS, QWS[:1]), ValueError, "b_q (N, K)"),
    bad("int8_matmul", "device", "b_scale meta", lambda: fastllm.int8_matmul(QA, QW, QAS, QWS.to(OTHER)), ValueError, "b_scale is on"),
    bad("int8_matmul", "device", "b_q meta", lambda: fastllm.int8_matmul(QA, QW.to(OTHER), QAS, QWS), ValueError, "b_q is on"),
    bad("int8_matmul", "non_tensor", "a_scale float", lambda: fastllm.int8_matmul(QA, QW, 1.0, QWS), TypeError, "a_scale must be a tensor"),
    bad("int8_matmul", "non_tensor", "b_q list", lambda: fastllm.int8_matmul(QA, QW.tolist(), QAS, QWS), TypeError, "b_q must be a tensor"),
    bad("int8_matmul", "dtype", "bias float64", lambda: fastllm.int8_matmul(QA, QW, QAS, QWS, torch.zeros(5, dtype=torch.float64)), ValueError, "bias must be (5,)"),
    bad("w8a16_linear", "dtype", "x int", lambda: fastllm.w8a16_linear(QX.int(), QW, QWS), TypeError, "x must be a floating"),
    bad("w8a16_linear", "dtype", "w_q float", lambda: fastllm.w8a16_linear(QX, QW.float(), QWS), TypeError, "w_q must be an int8"),
    bad("w8a16_linear", "dtype", "w_scale float64", lambda: fastllm.w8a16_linear(QX, QW, QWS.double()), TypeError, "w_scale must be a float32"),
    bad("w8a16_linear", "device", "w_q meta", lambda: fastllm.w8a16_linear(QX, QW.to(OTHER), QWS), ValueError, "w_q is on"),
    bad("w8a16_linear", "rank", "x 0-dim", lambda: fastllm.w8a16_linear(torch.tensor(1.0), QW, QWS), ValueError, "x must have at least 1 dim"),
    bad("w8a16_linear", "shape", "w_scale", lambda: fastllm.w8a16_linear(QX, QW, QWS[:4]), ValueError, "w_scale must have shape (5,)"),
    bad("w8a16_linear", "shape", "bias", lambda: fastllm.w8a16_linear(QX, QW, QWS, rn(4)), ValueError, "bias must be (5,)"),
    bad("w8a16_linear", "non_tensor", "x list", lambda: fastllm.w8a16_linear(QX.tolist(), QW, QWS), TypeError, "x must be a tensor"),
    result("quantize_int8", "zero_size", "(4, 0)", [rn(4, 0)], fastllm.quantize_int8, lambda x: quantize_ref(x, -1)),
    result("quantize_int8", "zero_size", "(0, 4) along dim 0", [rn(0, 4)], lambda x: fastllm.quantize_int8(x, 0), lambda x: quantize_ref(x, 0)),
    result("quantize_int8", "zero_size", "(0, 4)", [rn(0, 4)], fastllm.quantize_int8, lambda x: quantize_ref(x, -1)),
    result("quantize_int8", "zero_size", "(2, 0, 3) along dim 1", [rn(2, 0, 3)], lambda x: fastllm.quantize_int8(x, 1), lambda x: quantize_ref(x, 1)),
    result("quantize_int8", "nonfinite", "nan and inf rows", [poke(poke(QX, NAN, 0, 3), INF, 2, 9)], fastllm.quantize_int8, lambda x: quantize_ref(x, -1)),
    result("int8_matmul", "nonfinite", "nan a_scale", [QA, QW, poke(QAS, NAN, 1), QWS], fastllm.int8_matmul,
           lambda a, b, sa, sb: int8_matmul_ref(a, b, sa.float(), sb.float(), None, torch.float32)),
    result("int8_matmul", "zero_size", "0 rows", [q8(0, 16), QW, rn(0), QWS], fastllm.int8_matmul,
           lambda a, b, sa, sb: int8_matmul_ref(a, b, sa.float(), sb.float(), None, torch.float32)),
    result("int8_matmul", "zero_size", "K = 0", [q8(3, 0), q8(5, 0), QAS, QWS], fastllm.int8_matmul,
           lambda a, b, sa, sb: int8_matmul_ref(a, b, sa.float(), sb.float(), None, torch.float32)),
    result("w8a16_linear", "nonfinite", "inf in x", [poke(QX, -INF, 1, 1), QW, QWS], fastllm.w8a16_linear,
           lambda x, w, s: w8a16_ref(x, w, s.float(), None)),
    result("w8a16_linear", "zero_size", "0 rows", [rn(0, 16), QW, QWS], fastllm.w8a16_linear,
           lambda x, w, s: w8a16_ref(x, w, s.float(), None)),
    result("w8a16_linear", "zero_size", "K = 0", [rn(3, 0), q8(5, 0), QWS], fastllm.w8a16_linear,
           lambda x, w, s: w8a16_ref(x, w, s.float(), None)),
    # -------------------------------------------------------------- qkv_projection, rotary_embedding
    bad("qkv_projection", "heads", "rows not (Hq + 2 Hkv) * D", lambda: fastllm.qkv_projection(PX, rn(30, 16), num_heads=2, num_kv_heads=1), ValueError, "weight's first dim 30"),
    bad("qkv_projection", "heads", "Hq % Hkv", lambda: fastllm.qkv_projection(PX, rn(35, 16), num_heads=3, num_kv_heads=2), ValueError, "num_heads (3) must be a multiple of num_kv_heads (2)"),
    bad("qkv_projection", "heads", "num_heads 0", lambda: fastllm.qkv_projection(PX, PW, num_heads=0, num_kv_heads=1), ValueError, "num_heads"),
    bad("qkv_projection", "dtype", "weight bf16", lambda: fastllm.qkv_projection(PX, PW.bfloat16(), num_heads=2, num_kv_heads=1), TypeError, "weight has dtype"),
    bad("qkv_projection", "device", "bias meta", lambda: fastllm.qkv_projection(PX, PW, PB.to(OTHER), num_heads=2, num_kv_heads=1), ValueError, "bias is on"),
    bad("qkv_projection", "rank", "x 2-D", lambda: fastllm.qkv_projection(PX[0], PW, num_heads=2, num_kv_heads=1), ValueError, "x must be 3-D"),
    bad("qkv_projection", "non_tensor", "weight list", lambda: fastllm.qkv_projection(PX, PW.tolist(), num_heads=2, num_kv_heads=1), TypeError, "weight must be a tensor"),
    bad("qkv_projection", "value", "num_kv_heads str", lambda: fastllm.qkv_projection(PX, PW, num_heads=2, num_kv_heads="1"), TypeError, "num_kv_heads must be an int"),
    result("qkv_projection", "nonfinite", "nan in x", [poke(PX, NAN, 1, 2, 3), PW, PB],
           lambda x, w, b: fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1), _qkv_eager),
    result("qkv_projection", "zero_size", "0 tokens", [rn(2, 0, 16), PW, PB],
           lambda x, w, b: fastllm.qkv_projection(x, w, b, num_heads=2, num_kv_heads=1), _qkv_eager),
    bad("rotary_embedding", "ids", "position 9 >= table 9", lambda: fastllm.rotary_embedding(RQ, RK, COS, SIN, poke(POS, 9, 1, 4)), ValueError, "positions"),
    bad("rotary_embedding", "ids", "position -1", lambda: fastllm.rotary_embedding(RQ, RK, COS, SIN, poke(POS, -1, 0, 0)), ValueError, "positions"),
    result("rotary_embedding", "nonfinite", "nan in q, inf in k", [poke(RQ, NAN, 0, 1, 2, 3), poke(RK, INF, 1, 0, 4, 12), COS, SIN, POS],
           fastllm.rotary_embedding, rope_ref),
    result("rotary_embedding", "zero_size", "0 tokens", [rn(2, 4, 0, 16), rn(2, 2, 0, 16), COS, SIN, POS[:, :0]],
           fastllm.rotary_embedding, rope_ref),
    # -------------------------------------------------------------- modules, models and switches
    bad("quantize_", "non_tensor", "model not a module", lambda: fastllm.quantize_("model"), TypeError, "model must be an nn.Module"),
    bad("quantize_", "value", "mode", lambda: fastllm.quantize_(torch.nn.Linear(4, 4), "int4"), ValueError, "unknown mode 'int4'"),
    bad("quantize_", "non_tensor", "Int8Linear.from_float(ReLU)", lambda: fastllm.nn.Int8Linear.from_float(torch.nn.ReLU()), TypeError, "expected an nn.Linear"),
    bad("accelerate", "non_tensor", "model str", lambda: fastllm.accelerate("model"), TypeError, "model must be a torch.nn.Module"),
    bad("accelerate", "value", "mlp int", lambda: fastllm.accelerate(torch.nn.LayerNorm(4), mlp=1), TypeError, "mlp must be a bool"),
    bad("accelerate", "value", "quantize", lambda: fastllm.accelerate(torch.nn.LayerNorm(4), quantize="fp8"), ValueError, "unknown quantize 'fp8'"),
    bad("restore", "non_tensor", "model None", lambda: fastllm.restore(None), TypeError, "model must be a torch.nn.Module"),
    bad("backend", "value", "name", lambda: fastllm.backend("gpu").__enter__(), ValueError, "unknown backend 'gpu'"),
    bad("backend", "non_tensor", "name int", lambda: fastllm.backend(1).__enter__(), ValueError, "unknown backend 1"),
    bad("models.from_hf", "non_tensor", "object", lambda: fastllm.models.from_hf(object()), TypeError, "expected a transformers model"),
    bad("models.from_hf", "dtype", "dtype int8", lambda: fastllm.models.from_hf(_llama_hf(), dtype=torch.int8), TypeError, "dtype must be a floating"),
    bad("models.save_pretrained", "non_tensor", "not a zoo model", lambda: fastllm.models.save_pretrained(torch.nn.Linear(2, 2), "unused"), TypeError, "expected a fastllm.models model"),
    bad("models.Llama", "ids", "id = vocab", lambda: _forward(_llama(), _ids([1, 64])), ValueError, "input_ids"),
    bad("models.Llama", "ids", "id -1", lambda: _forward(_llama(), _ids([-1, 2])), ValueError, "input_ids"),
    bad("models.Llama", "dtype", "ids float", lambda: _forward(_llama(), torch.ones(1, 2)), ValueError, "input_ids"),
    bad("models.Llama", "zero_size", "no token", lambda: _forward(_llama(), torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    bad("models.Llama", "non_tensor", "ids list", lambda: _forward(_llama(), [[1, 2]]), TypeError, "input_ids"),
    bad("models.generate", "ids", "prompt id = vocab", lambda: fastllm.models.generate(_llama(), _ids([1, 64]), max_new_tokens=2), ValueError, "input_ids"),
    bad("models.generate", "ids", "eos_token_id = vocab", lambda: fastllm.models.generate(_llama(), _ids([1, 2]), max_new_tokens=2, eos_token_id=64), ValueError, "eos_token_id"),
    bad("models.generate", "non_tensor", "model", lambda: fastllm.models.generate(torch.nn.Linear(2, 2), _ids([1, 2])), TypeError, "model"),
    bad("models.generate", "value", "max_new_tokens 0", lambda: fastllm.models.generate(_llama(), _ids([1, 2]), max_new_tokens=0), ValueError, "max_new_tokens"),
    bad("models.generate_stream", "ids", "prompt id -5", lambda: fastllm.models.generate_stream(_llama(), _ids([-5, 2])), ValueError, "input_ids"),
]  # fmt: skip

if hasattr(fastllm, "profile"):  # (fastllm.profile: being written beside this module)
    CASES += [
        bad("profile", "value", "variants without eager", lambda: fastllm.profile(torch.nn.Linear(2, 2), torch.ones(2), variants={"x": abs}), ValueError, "variants need an 'eager' one"),
        bad("profile", "non_tensor", "model str", lambda: fastllm.profile("model", torch.ones(2)), TypeError, "model"),
        bad("profile", "value", "rounds 0", lambda: fastllm.profile(torch.nn.Linear(2, 2), torch.ones(2), rounds=0), ValueError, "rounds"),
        bad("profile", "value", "budget_s -1", lambda: fastllm.profile(torch.nn.Linear(2, 2), torch.ones(2), budget_s=-1), ValueError, "budget_s"),
    ]  # fmt: skip


def _imported(fn_of: Callable[[str], str], module, table: str) -> list[Case]:
    return [bad(fn_of(name), f"imported:{module.__name__}", name, call, exc, msg)
            for name, call, exc, msg in getattr(module, table)]  # fmt: skip


def _norm_fn(name: str) -> str:
    return "layer_norm family"


def _attn_fn(name: str) -> str:
    if name.startswith(("seqlens", "decode")):
        return "decode_attention"
    return "scaled_dot_product_attention" if name.startswith("sdpa") else "flash_attention"


IMPORTED = (
    _imported(_norm_fn, test_layer_norm, "BAD")
    + _imported(_attn_fn, test_attention_ops, "BAD")
    + _imported(lambda name: "rotary_embedding", test_rope, "BAD")
    + _imported(lambda name: "rope_tables", test_rope, "BAD_TABLES")
)

# from_pretrained's cases need files (test_from_pretrained_* below, parametrized by these lists): counted here.
PICKLE_NAMES = ["pytorch_model.bin", "model.pt", "weights.pth", "model.pkl"]
OUTSIDE = ["../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE"]
ODD_NAMES = [("model.npz", "not a .safetensors file"), (3, "not a file name"), ("", "not a file name")]
FILE_CASES = (
    [("models.from_pretrained", "path", f"{n} alone") for n in PICKLE_NAMES]
    + [("models.from_pretrained", "path", f"index names {n}") for n in PICKLE_NAMES]
    + [("models.from_pretrained", "path", f"index names {w}") for w in OUTSIDE]
    + [("models.from_pretrained", "path", f"index names {n!r}") for n, _ in ODD_NAMES]
    + [("models.from_pretrained", "path", "no config.json"), ("models.from_pretrained", "dtype", "dtype int8")]
)

ALL = CASES + IMPORTED


def _check_refusal(case: Case) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        case.call()
    assert isinstance(info.value, case.exc), f"{case.id}: {type(info.value).__name__}: {info.value}"
    assert case.match in str(info.value), f"{case.id}: {info.value!r} does not say {case.match!r}"


def _f64(a):
    return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a


def _outputs(t) -> list[torch.Tensor]:
    return list(t) if isinstance(t, (tuple, list)) else [t]


def _check_result(case: Case) -> None:
    got = _outputs(case.fast(*case.args))
    eager = _outputs(case.eager(*case.args))
    ref = _outputs(case.eager(*(_f64(a) for a in case.args)))
    assert len(got) == len(eager), f"{case.id}: {len(got)} outputs, eager {len(eager)}"
    for i, (g, e, r) in enumerate(zip(got, eager, ref, strict=True)):
        what = f"{case.id} output {i}"
        assert g.shape == e.shape and g.dtype == e.dtype, f"{what}: {g.shape} {g.dtype}, eager {e.shape} {e.dtype}"
        if not g.is_floating_point() or not r.is_floating_point():
            assert torch.equal(g, e), f"{what}: differs from the reference"
        else:
            assert_same_nonfinite(g, e, what)
            assert_equivalent(g, e, r.to(torch.float64), what)


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=f"known bug: {case.bug}")] if case.bug else []
    return pytest.param(case, marks=marks, id=case.id)


@pytest.mark.parametrize("case", [_param(c) for c in ALL])
def test_bad_input(case):
    if case.exc is not None:
        _check_refusal(case)
    else:
        _check_result(case)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_fixed_bugs_on_every_backend(need_backend, backend):
    """The three bugs issue 15 found, on each backend: quantize_int8 of (4, 0) (the C++ kernel refused K = 0 with
    'quantize_rows: bad arguments'), decode_attention with fewer cached tokens than new ones (zero rows, silently),
    attention with 0 heads (a message about 'multiple of key/value heads (0)')."""
    need_backend(backend)
    with fastllm.backend(backend):
        q, s = fastllm.quantize_int8(torch.randn(4, 0))
        assert q.shape == (4, 0) and q.dtype == torch.int8 and torch.equal(s, torch.ones(4)), (q, s)
        x = torch.randn(4, 0).requires_grad_()  # the registered op too (grad mode: not the direct path)
        assert torch.equal(fastllm.quantize_int8(x)[1], torch.ones(4))
        with pytest.raises(ValueError, match=r"cache_seqlens must count the 3 new tokens .* got \[2\]"):
            fastllm.decode_attention(AQ, KC, VC, torch.tensor([6, 2], dtype=I32))
        with pytest.raises(ValueError, match="k/v have 0 heads"):
            fastllm.flash_attention(AQ, torch.randn(2, 0, 5, 8), torch.randn(2, 0, 5, 8))


# ---------------------------------------------------------------------------------------------- from_pretrained


def _model_dir(tmp_path, weight_map=None):
    """A directory with a Llama config.json (and a model.safetensors.index.json when weight_map is given)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_llama_hf().config.to_dict()))
    if weight_map is not None:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


class _Trap:
    """Unpickling this writes a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_trap(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump(_Trap(marker), f)


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_from_pretrained_refuses_pickle(tmp_path, name):
    """A checkpoint of pickle files is refused with a clear error and never unpickled (torch.load would run the
    trap): alone in the directory, or named by a sharded index."""
    marker = tmp_path / "unpickled"
    d = _model_dir(tmp_path)
    _pickle_trap(d / name, marker)
    with pytest.raises(ValueError, match="only safetensors are read, never pickle"):
        fastllm.models.from_pretrained(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
    with pytest.raises(ValueError, match=f"names the pickle file '{name}'"):
        fastllm.models.from_pretrained(d)
    assert not marker.exists(), "a pickle file was loaded"


def _one_shard(path, state) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))


@pytest.mark.parametrize("where", OUTSIDE)
def test_from_pretrained_refuses_paths_outside(tmp_path, where):
    """An index may only name files inside the model directory: `..` and absolute paths are refused before any
    file is opened (the file outside exists and is valid)."""
    outside = tmp_path / "x.safetensors"
    _one_shard(outside, {"lm_head.weight": torch.zeros(64, 32)})
    name = str(outside) if where == "ABSOLUTE" else where
    d = _model_dir(tmp_path, {"lm_head.weight": name})
    with pytest.raises(ValueError, match="outside the model directory"):
        fastllm.models.from_pretrained(d)


@pytest.mark.parametrize("name,match", ODD_NAMES)
def test_from_pretrained_refuses_odd_shard_names(tmp_path, name, match):
    d = _model_dir(tmp_path, {"lm_head.weight": name})
    with pytest.raises(ValueError, match=match):
        fastllm.models.from_pretrained(d)


def test_from_pretrained_other_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        fastllm.models.from_pretrained(tmp_path / "nowhere")
    d = _model_dir(tmp_path)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        fastllm.models.from_pretrained(d, dtype=torch.int8)


def test_from_pretrained_shards_in_a_subdirectory_still_load(tmp_path):
    """The path check refuses only what leaves the directory: shards in a subdirectory of it (and the index naming
    them with ./) load, and give the model's outputs."""
    from safetensors.torch import load_file

    ours = fastllm.models.from_hf(_llama_hf())
    src = tmp_path / "saved"
    fastllm.models.save_pretrained(ours, src)
    sd = load_file(str(src / "model.safetensors"))
    names = sorted(sd)
    shards = {"shards/a.safetensors": names[::2], "./shards/b.safetensors": names[1::2]}
    d = _model_dir(tmp_path, {k: fn for fn, keys in shards.items() for k in keys})
    (d / "shards").mkdir()
    for fn, keys in shards.items():
        _one_shard(d / fn, {k: sd[k] for k in keys})
    again = fastllm.models.from_pretrained(d)
    with torch.inference_mode():
        assert torch.equal(again(_ids([1, 2, 3])), ours(_ids([1, 2, 3])))


# ---------------------------------------------------------------------------------------------- coverage, count

EXEMPT = {
    "Dispatch": "a record type (fastllm.explain's entries), not called by users",
    "clear_weight_cache": "takes no argument",
    "explain": "takes no argument",
    "get_backend": "takes no argument (FASTLLM_BACKEND is validated at import: test_framework.py)",
    "models": "a module: its functions are the models.* rows",
    "nn": "a module: its modules call the ops above; Int8Linear.from_float is a quantize_ row",
}


def test_every_public_function_has_cases():
    """Every name of fastllm.__all__ (and the zoo's loading and generation functions) has rows in the table, or is
    exempt with a reason; every public op has refusal rows and documented-result rows (NaN / Inf and zero-size);
    the imported tables are not empty (an import that lost its table would silently lower the count)."""
    names = {c.fn for c in ALL} | {fn for fn, _, _ in FILE_CASES}
    missing = [n for n in fastllm.__all__ if n not in names and n not in EXEMPT]
    assert not missing, f"public functions without bad-input cases: {missing}"
    for fn in ("from_pretrained", "from_hf", "generate", "generate_stream", "save_pretrained"):
        assert f"models.{fn}" in names, fn
    rows = Counter((c.fn, "refused" if c.exc else "result") for c in ALL)
    tensor_ops = [n for n in fastllm.ops.__all__ if n != "clear_weight_cache"]
    for fn in tensor_ops:  # every op: refusals, and the documented results (NaN / Inf and empty inputs)
        assert rows[fn, "refused"] >= 2 and rows[fn, "result"] >= 2, (fn, rows[fn, "refused"], rows[fn, "result"])
        kinds = {c.kind for c in CASES if c.fn == fn}
        assert {"nonfinite", "zero_size"} <= kinds, f"{fn}: {sorted(kinds)}"
    for module, table in ((test_layer_norm, "BAD"), (test_attention_ops, "BAD"), (test_rope, "BAD"),
                          (test_rope, "BAD_TABLES")):  # fmt: skip
        assert len(getattr(module, table)) >= 10, f"{module.__name__}.{table} is (nearly) empty"


def test_count(request):
    """Prints `N bad-input cases` (per class) past pytest's capture, for the issue's note."""
    by_kind = Counter(c.kind if not c.kind.startswith("imported") else "imported (tables beside the ops)" for c in ALL)
    by_kind.update(kind for _, kind, _ in FILE_CASES)
    total = len(ALL) + len(FILE_CASES)
    assert total == sum(by_kind.values())
    line = f"{total} bad-input cases over {len({c.fn for c in ALL} | {f for f, _, _ in FILE_CASES})} functions: " + (
        ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
    )
    request.node.user_properties.append(("bad_input_cases", total))
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(f"\n{line}")
    else:
        print(line)


if os.environ.get("FASTLLM_BAD_INPUTS_LIST"):  # FASTLLM_BAD_INPUTS_LIST=1: print the table at import
    for c in ALL:
        print(c.id)
