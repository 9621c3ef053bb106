"""The Triton attention kernels (launchers in kernels/triton/attention.py, kernels in attention_fwd.py and
attention_bwd.py): forward, split-K decode and backward against the float64 reference, called directly and
through the public API on the triton backend (the interpreter on CPU).

Criterion (fastllm.testing.assert_equivalent): err(ours) <= 2 * err(eager) + floor, errors against attention_ref
in float64 (gradients: torch autograd through it). "Eager" is what a PyTorch user runs in the input dtype:
torch.nn.functional.scaled_dot_product_attention in that dtype (and its autograd), with the semantics written as an
explicit attn_mask (causal alignment, kv_len, bool or additive mask) and enable_gqa=True. For lse, which SDPA does
not return, eager is attention_ref on the inputs as given (fp32 math for every input dtype, as lse is fp32).

The kernels save either lse or the (m, l) row statistics for the backward (attn_fwd(stats=True)); the statistics
give the more accurate gradients (kernel module docstring), so most gradient tests use them, and
test_backward_from_lse covers the lse form.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.ops.attention import attention_ref
from fastllm.testing import assert_equivalent

pytest.importorskip("triton")
from fastllm.kernels.triton import attention as tri

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BF16 = torch.bfloat16
F32 = torch.float32


def make(B, Hq, Hkv, Sq, Sk, D, dtype):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=DEVICE)
    return q, k, v


def visible(B, Hq, Sq, Sk, kv_len, causal, bottom_right, device=DEVICE):
    """Bool (B, Hq, Sq, Sk): the causal / kv_len part of the semantics, written independently of the op."""
    j = torch.arange(Sk, device=device)
    i = torch.arange(Sq, device=device).view(-1, 1)
    sk_b = kv_len.long() if kv_len is not None else torch.full((B,), Sk, device=device)
    sk_b = sk_b.view(B, 1, 1, 1)
    vis = (j < sk_b).expand(B, Hq, Sq, Sk)
    if causal:
        vis = vis & (j <= i + (sk_b - Sq if bottom_right else 0))
    return vis


def eager_sdpa(q, k, v, mask, kv_len, causal, bottom_right, scale):
    """torch SDPA in q's dtype with everything folded into one explicit attn_mask."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    vis = visible(B, Hq, Sq, Sk, kv_len, causal, bottom_right, q.device)
    if mask is None or mask.dtype == torch.bool:
        attn = vis if mask is None else vis & mask
    else:
        attn = mask.expand(B, Hq, Sq, Sk).masked_fill(~vis, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale, enable_gqa=True)


def mask64(mask):
    """The mask for the float64 reference: bool masks as they are, additive ones in float64."""
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


def with_grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn(q, k, v) with loss = sum(out * dout) in float64."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    (out.double() * dout.double()).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def ref_fn(mask, kv_len, causal, bottom_right, scale):
    m = mask64(mask)
    return lambda q, k, v: attention_ref(q, k, v, m, kv_len, causal, bottom_right, scale)[0]


def eager_fn(mask, kv_len, causal, bottom_right, scale):
    return lambda q, k, v: eager_sdpa(q, k, v, mask, kv_len, causal, bottom_right, scale)


def as_lse(saved):
    """Natural-log lse per row from what a forward saved: lse (B, Hq, Sq) itself, or (m, l) stats (B, Hq, Sq, 2)
    with m the base-2 row max: lse = (m + log2 l) ln 2 (computed in float64; +inf stays +inf)."""
    if saved.dim() == 3:
        return saved
    st = saved.double()
    return ((st[..., 0] + torch.log2(st[..., 1])) * math.log(2.0)).to(saved.dtype)


def check_fwd(out, saved, q, k, v, mask, kv_len, causal, bottom_right, scale, name, rows=None):
    """out and lse (or the lse the stats describe) against the float64 reference (rows: optional bool (Sq,)
    selecting the query rows compared)."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref_out, ref_saved = attention_ref(q64, k64, v64, mask64(mask), kv_len, causal, bottom_right, scale)
    ref_lse = as_lse(ref_saved)
    eager_out = eager_sdpa(q, k, v, mask, kv_len, causal, bottom_right, scale)
    eager_lse = as_lse(attention_ref(q, k, v, mask, kv_len, causal, bottom_right, scale)[1])
    lse = as_lse(saved)
    sel = (lambda t: t[:, :, rows]) if rows is not None else (lambda t: t)
    assert torch.isfinite(eager_out).all(), "eager produced NaN/Inf: the tolerance would be meaningless"
    assert_equivalent(sel(out), sel(eager_out), sel(ref_out), f"{name} out")
    assert_equivalent(sel(lse), sel(eager_lse), sel(ref_lse), f"{name} lse")


def check_bwd(grads, q, k, v, dout, mask, causal, bottom_right, scale, name):
    ref = with_grads(ref_fn(mask, None, causal, bottom_right, scale), q.double(), k.double(), v.double(), dout)
    eager = with_grads(eager_fn(mask, None, causal, bottom_right, scale), q, k, v, dout)
    for gname, g, e, r in zip(["dq", "dk", "dv"], grads, eager[1:], ref[1:], strict=True):
        assert torch.isfinite(e).all(), f"{name} eager {gname} has NaN/Inf"
        assert_equivalent(g, e, r, f"{name} {gname}")


# --------------------------------------------------------------------------------------------------
# The kernels called directly (no mask): shapes, GQA ratios, alignments, both paths for short queries.

# (B, Hq, Hkv, Sq, Sk, D, causal, bottom_right)
CASES = [
    (1, 2, 1, 1, 17, 8, False, False),  # one query row (decode path by default), GQA 2
    (2, 4, 2, 17, 17, 40, True, False),  # square causal, GQA 2, D not a power of two
    (1, 3, 1, 33, 20, 64, True, True),  # MQA, Sq > Sk bottom-right: the first 13 rows see no key
    (1, 2, 2, 20, 45, 40, True, True),  # MHA, Sk > Sq bottom-right
    (2, 2, 2, 33, 20, 8, False, False),  # non-causal, Sq > Sk
    (1, 4, 1, 20, 45, 64, True, False),  # MQA top-left
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_direct(case, dtype):
    B, Hq, Hkv, Sq, Sk, D, causal, br = case
    q, k, v = make(B, Hq, Hkv, Sq, Sk, D, dtype)
    dout = torch.randn_like(q)
    scale = D**-0.5
    out, lse = tri.attn_fwd(q, k, v, None, None, causal, br, scale)
    assert out.is_contiguous() and lse.is_contiguous() and lse.dtype == F32 and lse.shape == (B, Hq, Sq)
    check_fwd(out, lse, q, k, v, None, None, causal, br, scale, f"{case} {dtype}")
    out_s, stats = tri.attn_fwd(q, k, v, None, None, causal, br, scale, stats=True)
    assert torch.equal(out_s, out) and stats.shape == (B, Hq, Sq, 2) and stats.is_contiguous()
    check_fwd(out, stats, q, k, v, None, None, causal, br, scale, f"{case} {dtype} stats")
    grads = tri.attn_bwd(dout, q, k, v, out, stats, None, causal, br, scale)
    for g, t in zip(grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
    check_bwd(grads, q, k, v, dout, None, causal, br, scale, f"{case} {dtype}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=str)
def test_backward_from_lse(case, dtype):
    """attn_bwd from the lse that attn_fwd returns by default (P = exp(s - lse))."""
    B, Hq, Hkv, Sq, Sk, D, causal, br = case
    q, k, v = make(B, Hq, Hkv, Sq, Sk, D, dtype)
    dout = torch.randn_like(q)
    out, lse = tri.attn_fwd(q, k, v, None, None, causal, br, D**-0.5)
    grads = tri.attn_bwd(dout, q, k, v, out, lse, None, causal, br, D**-0.5)
    check_bwd(grads, q, k, v, dout, None, causal, br, D**-0.5, f"from lse {case} {dtype}")


PEAKED = [
    (50, False),
    (300, False),
    pytest.param(
        50, True,
        marks=pytest.mark.skipif(
            not ON_GPU,
            reason="the interpreter's numpy matmul rounds a dot product differently depending on its row in the tile, "
            "and the decode kernel packs a GQA group's rows differently from the backward's tiles",
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize("sk, decode", PEAKED)
def test_peaked_rows_fp32(sk, decode):
    """scale = 1 with D = 64: scores of std 8, rows dominated by a few keys, |s2| ~ 30. The backward must recompute
    the forward's scores to the bit and use the (m, l) statistics, or fp32 dV misses the criterion (by up to 2.7x
    before both were so); after the decode forward, its combined (m, l) must be those too (GPU: the tensor-core and
    FMA dots round a product the same in any tile position)."""
    q, k, v = make(1, 2, 1, 20, sk, 64, F32)
    dout = torch.randn_like(q)
    out, stats = tri.attn_fwd(q, k, v, None, None, True, True, 1.0, decode=decode, stats=True)
    check_fwd(out, stats, q, k, v, None, None, True, True, 1.0, f"peaked sk={sk}")
    grads = tri.attn_bwd(dout, q, k, v, out, stats, None, True, True, 1.0)
    check_bwd(grads, q, k, v, dout, None, True, True, 1.0, f"peaked sk={sk} decode={decode}")


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_short_queries_both_paths(decode, dtype):
    """Sq <= 16 goes to the split-K decode kernels by default; the FlashAttention-2 kernel must agree, and the
    decode kernel must also take a mask, both alignments and G * Sq rows spanning several row tiles."""
    q, k, v = make(2, 6, 2, 7, 40, 40, dtype)  # G * Sq = 21 packed rows: two 16-row tiles
    mask = torch.rand(2, 6, 7, 40, device=DEVICE) > 0.3  # a different mask per head of a group
    mask[1, 4, 2] = False  # a fully masked row
    for causal, br in [(True, True), (True, False), (False, False)]:
        out, lse = tri.attn_fwd(q, k, v, mask, None, causal, br, 0.3, decode=decode, stats=causal and br)
        check_fwd(out, lse, q, k, v, mask, None, causal, br, 0.3, f"decode={decode} causal={causal} br={br}")


def test_fp16_and_wide_head_dim():
    """float16 and a head dim above 128 (BLOCK_D = 256, masked lanes 160..255)."""
    q, k, v = make(1, 2, 1, 18, 21, 160, torch.float16)
    dout = torch.randn_like(q)
    out, lse = tri.attn_fwd(q, k, v, None, None, True, True, 0.1, stats=True)
    check_fwd(out, lse, q, k, v, None, None, True, True, 0.1, "fp16 D=160")
    check_bwd(
        tri.attn_bwd(dout, q, k, v, out, lse, None, True, True, 0.1), q, k, v, dout, None, True, True, 0.1, "fp16"
    )


def test_strided_inputs():
    """q / k / v as (B, S, H, D) tensors viewed as (B, H, S, D): the kernels read the given strides."""
    B, H, Sq, Sk, D = 2, 2, 19, 23, 24
    q = torch.randn(B, Sq, H, D, device=DEVICE).transpose(1, 2)
    kv = torch.randn(B, Sk, 2, H, D, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    dout = torch.randn(B, Sq, H, D, device=DEVICE).transpose(1, 2)
    out, lse = tri.attn_fwd(q, k, v, None, None, True, True, 0.2, stats=True)
    check_fwd(out, lse, q, k, v, None, None, True, True, 0.2, "strided")
    grads = tri.attn_bwd(dout, q, k, v, out, lse, None, True, True, 0.2)
    check_bwd(grads, q, k, v, dout, None, True, True, 0.2, "strided")


# --------------------------------------------------------------------------------------------------
# Several blocks on tiny shapes (forced block sizes) and the causal block skip.


@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)], ids=str)
@pytest.mark.parametrize("causal, br", [(True, False), (True, True), (False, False)])
def test_forced_blocks(blocks, causal, br):
    """Query and key lengths spanning 3-5 tiles, tiles of unequal sizes, an additive mask on the full blocks too."""
    bm, bn = blocks
    q, k, v = make(1, 2, 1, 70, 50, 16, F32)
    dout = torch.randn_like(q)
    mask = 0.5 * torch.randn(1, 2, 70, 50, device=DEVICE)
    out, lse = tri.attn_fwd(q, k, v, mask, None, causal, br, 0.25, block_m=bm, block_n=bn, stats=True)
    check_fwd(out, lse, q, k, v, mask, None, causal, br, 0.25, f"{blocks}")
    grads = tri.attn_bwd(dout, q, k, v, out, lse, mask, causal, br, 0.25, block_m=bm, block_n=bn)
    check_bwd(grads, q, k, v, dout, mask, causal, br, 0.25, f"{blocks}")


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN rows
@pytest.mark.parametrize("br", [False, True])
def test_causal_skip_never_reads_invisible_blocks(br):
    """Blocks that no row of a tile can see are not visited: NaN planted in them must not reach that tile.

    Sq = 48, Sk = 64, 16 x 16 tiles. Forward / dQ: V and K of key block 2 (keys 32..47) are NaN; the query rows
    that see none of those keys (i + offset < 32, a whole number of tiles) must come out exactly as with clean
    inputs (a visited block would turn them into NaN through 0 * NaN in P V). dK / dV: Q and dO of query block 0
    are NaN; the keys that row block cannot see (j > 15 + offset) must get clean gradients.
    """
    Sq, Sk, D = 48, 64, 16
    offset = Sk - Sq if br else 0
    q, k, v = make(1, 2, 1, Sq, Sk, D, F32)
    dout = torch.randn_like(q)
    kn, vn = k.clone(), v.clone()
    kn[:, :, 32:48] = float("nan")
    vn[:, :, 32:48] = float("nan")
    out, lse = tri.attn_fwd(q, kn, vn, None, None, True, br, 0.25, block_m=16, block_n=16, decode=False)
    clean = torch.arange(Sq, device=DEVICE) + offset < 32
    assert clean.sum() % 16 == 0 and clean.any()
    check_fwd(out, lse, q, k, v, None, None, True, br, 0.25, "skip fwd", rows=clean)
    out, lse = tri.attn_fwd(q, k, v, None, None, True, br, 0.25, block_m=16, block_n=16, decode=False, stats=True)
    dq, _, _ = tri.attn_bwd(dout, q, kn, vn, out, lse, None, True, br, 0.25, block_m=16, block_n=16)
    dq_clean, dk_clean, dv_clean = tri.attn_bwd(dout, q, k, v, out, lse, None, True, br, 0.25, block_m=16, block_n=16)
    assert torch.equal(dq[:, :, clean], dq_clean[:, :, clean])
    qn, don = q.clone(), dout.clone()
    qn[:, :, :16] = float("nan")
    don[:, :, :16] = float("nan")
    _, dk, dv = tri.attn_bwd(don, qn, k, v, out, lse, None, True, br, 0.25, block_m=16, block_n=16)
    keys = torch.arange(Sk, device=DEVICE) > 15 + offset
    assert keys.sum() % 16 == 0 and keys.any() and torch.isnan(dk[:, :, ~keys]).any()
    # the skipped query block never enters these keys' sums, so they are bit for bit those of the clean run
    assert torch.equal(dk[:, :, keys], dk_clean[:, :, keys]) and torch.equal(dv[:, :, keys], dv_clean[:, :, keys])


def test_bad_block_sizes():
    q, k, v = make(1, 1, 1, 4, 4, 8, F32)
    with pytest.raises(ValueError, match="power of two >= 16"):
        tri.attn_fwd(q, k, v, None, None, False, False, 1.0, block_m=24)
    with pytest.raises(ValueError, match="power of two >= 16"):
        tri.attn_fwd(q, k, v, None, None, False, False, 1.0, block_n=8, decode=True)


# --------------------------------------------------------------------------------------------------
# The public API on the triton backend: masks, GQA, autograd through fastllm::attention_fwd / attention_bwd.


def run_public(fn, q, k, v, dout):
    with fastllm.backend("triton"), fastllm.explain() as log:
        got = with_grads(fn, q, k, v, dout)
    ops = {(d.op, d.backend) for d in log}
    assert ops == {("attention_fwd", "triton"), ("attention_bwd", "triton")}, [str(d) for d in log]
    return got


def check_public(fn, q, k, v, mask, causal, br, scale, name):
    """Forward and gradients of a public function against SDPA (eager) and the float64 reference."""
    dout = torch.randn_like(q)
    got = run_public(fn, q, k, v, dout)
    ref = with_grads(ref_fn(mask, None, causal, br, scale), q.double(), k.double(), v.double(), dout)
    eager = with_grads(eager_fn(mask, None, causal, br, scale), q, k, v, dout)
    for gname, g, e, r in zip(["out", "dq", "dk", "dv"], got, eager, ref, strict=True):
        assert torch.isfinite(e).all(), f"{name} eager {gname} has NaN/Inf"
        assert_equivalent(g, e, r, f"{name} {gname}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=lambda h: f"hkv{h}")
def test_public_flash_attention_gqa(hkv, dtype):
    """fastllm.flash_attention (causal is bottom-right) with GQA ratios 1, 2 and 4 (MQA)."""
    q, k, v = make(2, 4, hkv, 20, 33, 40, dtype)
    scale = 40**-0.5
    fn = lambda q, k, v: fastllm.flash_attention(q, k, v, causal=True)
    check_public(fn, q, k, v, None, True, True, scale, f"flash_attention hkv={hkv}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_public_sdpa_bool_mask_with_empty_row(dtype):
    """A bool mask with a fully masked row: out = 0 there, and no NaN in any gradient."""
    q, k, v = make(1, 2, 2, 19, 26, 8, dtype)
    mask = torch.rand(1, 2, 19, 26, device=DEVICE) > 0.4
    mask[0, 1, 5] = False
    mask[0, 0, :, 3] = False  # a key nobody sees: dk = dv = 0 there
    fn = lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    check_public(fn, q, k, v, mask, False, False, 8**-0.5, "sdpa bool mask")
    out = fastllm.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[0, 1, 5] == 0).all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_public_sdpa_additive_mask(dtype):
    """An additive float mask (a non-contiguous view, broadcast over the batch) with GQA."""
    q, k, v = make(2, 4, 2, 17, 21, 64, dtype)
    big = torch.randn(1, 4, 21, 17, dtype=dtype, device=DEVICE)
    mask = big.transpose(-1, -2)  # (1, 4, 17, 21), column-major
    fn = lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    check_public(fn, q, k, v, mask, False, False, 64**-0.5, "sdpa additive mask")


@pytest.mark.parametrize("sq", [3, 20], ids=lambda s: f"sq{s}")
def test_public_sdpa_key_padding_mask(sq):
    """A (B, 1, 1, Sk) key padding mask (strides 0 on heads and queries), top-left is_causal elsewhere; Sq = 3
    runs the decode kernel forward."""
    q, k, v = make(2, 2, 2, sq, 30, 8, BF16)
    pad = torch.ones(2, 1, 1, 30, dtype=torch.bool, device=DEVICE)
    pad[0, ..., 22:] = False
    fn = lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    check_public(fn, q, k, v, pad, False, False, 8**-0.5, "key padding")
    fn = lambda q, k, v: fastllm.scaled_dot_product_attention(q, k, v, is_causal=True)
    check_public(fn, q, k, v, None, True, False, 8**-0.5, "sdpa is_causal")


# --------------------------------------------------------------------------------------------------
# Decode: ragged cache lengths (including 0), garbage past them, both kernels, several split counts.


def decode_case(dtype, Sn, lens, Hq=4, Hkv=2, S_max=40, D=40):
    B = len(lens)
    q = torch.randn(B, Hq, Sn, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Hkv, S_max, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Hkv, S_max, D, dtype=dtype, device=DEVICE)
    kv_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # NaN past each sequence's length (what a reused cache may hold): it must never be read
    kn, vn = k.clone(), v.clone()
    for b, n in enumerate(lens):
        kn[b, :, n:] = float("nan")
        vn[b, :, n:] = float("nan")
    return q, k, v, kn, vn, kv_len


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("sn", [1, 3])
def test_public_decode_attention(sn, dtype):
    q, k, v, kn, vn, kv_len = decode_case(
        dtype, sn, [37, 0, 5, 40, 3]
    )  # (0 < len < sn is refused: test_attention_decode)
    with fastllm.backend("triton"), fastllm.explain() as log:
        out = fastllm.decode_attention(q, kn, vn, kv_len)
    assert [(d.op, d.backend) for d in log] == [("attention_fwd", "triton")], [str(d) for d in log]
    assert (out[1] == 0).all()  # kv_len 0: zeros
    ref_out, _ = attention_ref(q.double(), k.double(), v.double(), None, kv_len, True, True, 40**-0.5)
    eager = eager_sdpa(q, k, v, None, kv_len, True, True, 40**-0.5)
    assert_equivalent(out, eager, ref_out, f"decode_attention sn={sn}")


@pytest.mark.parametrize(
    "decode, splits, stats", [(True, 1, False), (True, 4, True), (True, 7, False), (False, None, True)]
)
def test_kv_len_paths(decode, splits, stats):
    """kv_len through the decode kernel with 1, 4 and 7 splits (7 > the blocks of short sequences: empty splits)
    and through the FlashAttention-2 kernel (Sq = 3 and 20), with NaN past the lengths; lse or stats out."""
    for sn in (3, 20):
        q, k, v, kn, vn, kv_len = decode_case(F32, sn, [37, 0, 5, 40], Hq=3, Hkv=1, D=24)
        for br in (True, False):
            out, lse = tri.attn_fwd(
                q, kn, vn, None, kv_len, True, br, 0.2, decode=decode, num_splits=splits, stats=stats
            )
            check_fwd(out, lse, q, k, v, None, kv_len, True, br, 0.2, f"kv_len decode={decode} sn={sn} br={br}")


def test_outputs_fully_written(monkeypatch):
    """Every element of every buffer the kernels allocate (out, lse, the decode partials, delta, dq, dk, dv) is
    written: with torch.empty poisoned to NaN, the results still meet the criterion (tiles with padded rows and
    keys, rows that see no key, empty decode splits)."""
    q, k, v = make(1, 4, 2, 33, 20, 40, F32)
    dout = torch.randn_like(q)
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        out, lse = tri.attn_fwd(q, k, v, None, None, True, True, 0.2, block_m=16, block_n=16, stats=True)
        grads = tri.attn_bwd(dout, q, k, v, out, lse, None, True, True, 0.2, block_m=16, block_n=16)
        out_dec, lse_dec = tri.attn_fwd(q, k, v, None, None, True, True, 0.2, decode=True, num_splits=5)
    check_fwd(out, lse, q, k, v, None, None, True, True, 0.2, "poisoned fwd")
    check_bwd(grads, q, k, v, dout, None, True, True, 0.2, "poisoned bwd")
    check_fwd(out_dec, lse_dec, q, k, v, None, None, True, True, 0.2, "poisoned decode")


# Compiles a few kernel variants for sm_80 and sm_90 with triton.compile (no GPU needed: Triton ships ptxas), with
# the alignment hints the JIT would give aligned arguments, and checks that the forward's K/V loads are pipelined
# (cp.async in the TTGIR; they were not while the head dim was a run-time value).
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastllm.kernels.triton import attention as fa

def build(name, dt, d, bm, bn, arch, **flags):
    fn = getattr(fa, name)
    block_d = max(16, triton.next_power_of_2(d))
    consts = dict(CAUSAL=flags.get("causal", True), BOTTOM_RIGHT=True, MASK_BOOL=flags.get("mask") == "bool",
                  HAS_MASK="mask" in flags, STATS=True, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                  DOT_UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, D=d, HAS_KV_LEN=flags.get("kv", False))
    declared = {fn.arg_names[i] for i in fn.constexprs}  # the kernel's own tl.constexpr parameters
    consts = {k: v for k, v in consts.items() if k in declared}
    ptrs = {n: "*" + dt for n in ("Q", "K", "V", "OUT", "DOUT", "DK", "DV", "DQ")}
    ptrs.update(LSE="*fp32", DELTA="*fp32", O_PART="*fp32", ML_PART="*fp32", KV_LEN="*i32")
    ptrs["MASK"] = "*i1" if flags.get("mask") == "bool" else "*" + dt
    for opt in ("MASK", "KV_LEN"):
        if opt in fn.arg_names and not consts.get("HAS_" + opt, False):
            consts[opt] = None
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n.endswith("scale") else "i32") for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n not in consts and (n in ptrs or n.startswith("stride_"))}
    src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
    opts = {"num_warps": 4, "num_stages": 2, "enable_fp_fusion": fa.FP_FUSION}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)

for arch in (80, 90):
    k = build("_attn_fwd_kernel", "bf16", 64, 64, 64, arch)
    assert "async_copy_global_to_local" in k.asm["ttgir"], f"sm_{arch}: forward K/V loads not pipelined"
    build("_attn_fwd_kernel", "fp32", 40, 32, 32, arch, mask="bool", kv=True)
    build("_attn_decode_kernel", "bf16", 128, 16, 64, arch, kv=True)
    build("_attn_bwd_dkdv_kernel", "bf16", 96, 32, 64, arch, mask="add")
    build("_attn_bwd_dq_kernel", "fp16", 64, 64, 32, arch, causal=False)
    build("_attn_bwd_dkdv_kernel", "fp32", 64, 16, 32, arch)
print("compiled")
"""


def test_kernels_compile_for_sm80_and_sm90():
    """The kernels compile for real GPUs (A100, H100) under this Triton, not just under the interpreter."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real @triton.jit functions
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]
