"""Rotary position embedding (RoPE) of q and k in one launch, forward and inverse (the backward), in Triton.

Glossary
    B, Hq, Hkv, S, D   batch, query heads, key heads, sequence, head dim
    R, HALF            rotary dim (even, R <= D) and R / 2: the table width
    P                  rows of the cos / sin tables (positions 0 .. P-1)
    row                one (b, h, s) head vector of D elements; q's B * Hq * S rows, then k's B * Hkv * S rows
    BLOCK_ROWS         rows one program rotates (a power of two)
    BLOCK_H            HALF rounded up to a power of two: the columns of one half-tile
    BLOCK_P            D - R rounded up to a power of two: the pass-through columns (HAS_PASS: D > R)

Per row, HF rotate_half convention (Llama / Mistral / Qwen2 / GPT-NeoX), p = positions[b, s], c = cos[p, i],
s = sin[p, i] (negated under INVERSE) for i < HALF:
    out[i] = x[i] c - x[i + HALF] s ;  out[i + HALF] = x[i + HALF] c + x[i] s ;  out[R:] = x[R:]
in fp32, each output rounded once to x's dtype; the pass-through columns are loaded and stored in x's dtype
(a bit copy). Inputs are strided along (b, h, s) with unit stride along D; outputs are contiguous. Row indices
and offsets are int64 (rows * D and b * stride_b can pass 2^31).
"""

import triton
import triton.language as tl
from fastllm.kernels.triton._launch import device_ctx

# Elements of one half-tile a program holds (BLOCK_ROWS * BLOCK_H): x1, x2, c, s and the two outputs are live at
# once, 6 x 2048 fp32 values = 96 per thread at 4 warps. The op moves ~2 x D elements per row; a few KiB per
# program keep enough bytes in flight without spilling.
TILE = 2048
NUM_WARPS = 4


@triton.jit
def _rope_rows(
    X, OUT, COS, SIN, POS,  # X: (B, H, S, D) strided; OUT: (B, H, S, D) contiguous; COS, SIN: (P, HALF); POS: (B, S)
    row0, n_rows, H, S, D, HALF, R,
    stride_b, stride_h, stride_s, stride_pb, stride_ps, stride_cs,
    INVERSE: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Rotate rows row0 .. row0 + BLOCK_ROWS - 1 (those < n_rows) of one tensor."""
    rows = row0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # (BLOCK_ROWS,) int64
    row_ok = rows < n_rows
    s_idx = rows % S
    bh = rows // S
    h_idx = bh % H
    b_idx = bh // H
    x_row = b_idx * stride_b + h_idx * stride_h + s_idx * stride_s  # (BLOCK_ROWS,) element offsets into X
    out_row = rows * D  # (BLOCK_ROWS,)
    pos = tl.load(POS + b_idx * stride_pb + s_idx * stride_ps, mask=row_ok, other=0).to(tl.int64)  # (BLOCK_ROWS,)
    cols = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    m = row_ok[:, None] & (cols < HALF)[None, :]  # (BLOCK_ROWS, BLOCK_H)
    t_off = pos[:, None] * stride_cs + cols[None, :]  # (BLOCK_ROWS, BLOCK_H) table offsets
    c = tl.load(COS + t_off, mask=m, other=0.0)
    s = tl.load(SIN + t_off, mask=m, other=0.0)
    if INVERSE:
        s = -s
    x_off = x_row[:, None] + cols[None, :]  # (BLOCK_ROWS, BLOCK_H)
    x1 = tl.load(X + x_off, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + HALF, mask=m, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    o_off = out_row[:, None] + cols[None, :]  # (BLOCK_ROWS, BLOCK_H)
    tl.store(OUT + o_off, y1.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_off + HALF, y2.to(OUT.dtype.element_ty), mask=m)
    if HAS_PASS:
        pc = R + tl.arange(0, BLOCK_P)  # (BLOCK_P,) columns R .. D-1
        mp = row_ok[:, None] & (pc < D)[None, :]  # (BLOCK_ROWS, BLOCK_P)
        v = tl.load(X + x_row[:, None] + pc[None, :], mask=mp)
        tl.store(OUT + out_row[:, None] + pc[None, :], v, mask=mp)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    rows_q, rows_k, Hq, Hkv, S, D, HALF, R,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_pb, stride_ps, stride_cs,
    INVERSE: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Programs 0 .. cdiv(rows_q, BLOCK_ROWS) - 1 rotate q's rows, the rest k's: q and k in one launch."""
    pid = tl.program_id(0).to(tl.int64)
    q_blocks = tl.cdiv(rows_q, BLOCK_ROWS)
    if pid < q_blocks:
        _rope_rows(Q, QO, COS, SIN, POS, pid * BLOCK_ROWS, rows_q, Hq, S, D, HALF, R,
                   stride_qb, stride_qh, stride_qs, stride_pb, stride_ps, stride_cs,
                   INVERSE, HAS_PASS, BLOCK_ROWS, BLOCK_H, BLOCK_P)  # fmt: skip
    else:
        _rope_rows(K, KO, COS, SIN, POS, (pid - q_blocks) * BLOCK_ROWS, rows_k, Hkv, S, D, HALF, R,
                   stride_kb, stride_kh, stride_ks, stride_pb, stride_ps, stride_cs,
                   INVERSE, HAS_PASS, BLOCK_ROWS, BLOCK_H, BLOCK_P)  # fmt: skip


def rope_fwd(q, k, cos, sin, positions, q_out, k_out, inverse: bool) -> None:
    """Write RoPE(q) into q_out and RoPE(k) into k_out (inverse: the rotation by -theta); the caller has validated
    everything. q (B, Hq, S, D), k (B, Hkv, S, D): same device and dtype (float32 / bfloat16 / float16), unit stride
    along D. cos, sin: (P, R / 2) float32 with unit column stride and one row stride, 1 <= R <= D. positions:
    (B, S) or (1, S) int32 / int64, all in [0, P). q_out, k_out: contiguous, q's and k's shapes and dtype."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    half = cos.shape[1]
    rows_q, rows_k = B * Hq * S, B * Hkv * S
    block_h = triton.next_power_of_2(half)
    block_rows = min(max(1, TILE // block_h), triton.next_power_of_2(max(rows_q, rows_k)))
    stride_pb = positions.stride(0) if positions.shape[0] > 1 else 0
    grid = (triton.cdiv(rows_q, block_rows) + triton.cdiv(rows_k, block_rows),)
    with device_ctx(q):
        _rope_kernel[grid](
            q, k, q_out, k_out, cos, sin, positions,
            rows_q, rows_k, Hq, Hkv, S, D, half, 2 * half,
            *q.stride()[:3], *k.stride()[:3], stride_pb, positions.stride(1), cos.stride(0),
            INVERSE=bool(inverse), HAS_PASS=2 * half < D,
            BLOCK_ROWS=block_rows, BLOCK_H=block_h, BLOCK_P=triton.next_power_of_2(max(1, D - 2 * half)),
            num_warps=NUM_WARPS,
        )  # fmt: skip
