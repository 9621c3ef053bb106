"""The QKV projection in Triton: one GEMM over the concatenated weight whose store writes q, k and v straight into the
attention layout (B, H, S, D), with no (B, S, N) intermediate and no transpose copy.

    y = x @ w.T + bias                                    x (B, S, hidden) read as (M, K); w (N, K), nn.Linear layout
    q[b, h, s, d] = y[b S + s, h D + d]                   h < Hq
    k[b, h, s, d] = y[b S + s, (Hq + h) D + d]            h < Hkv
    v[b, h, s, d] = y[b S + s, (Hq + Hkv + h) D + d]      h < Hkv

Glossary
    B, S        batch, sequence; M = B S rows of the GEMM (row m = (b, s) = (m // S, m % S))
    Hq, Hkv, D  query heads, key/value heads, head dim; N = (Hq + 2 Hkv) D columns (column n = head j = n // D of
                the Hq + 2 Hkv, element d = n % D), K = hidden
    acc         the (BLOCK_M, BLOCK_N) fp32 accumulator tile of one program

Kernel: one program per (BLOCK_M, BLOCK_N) tile of y, in gemm.py's grouped order; the K loop is gemm.py's
(_launch.mm_tile: fp32 accumulation, IEEE fp32 dots for fp32 inputs, masked tails, int64 offsets). The epilogue adds
the bias in fp32, rounds once, and stores element (m, n) at ((b H + h) S + s) D + d of q, k or v (H = Hq or Hkv, h
the head's index there). The address splits into a row part (b H S + s) D, one per row and tensor, and a column part
h S D + d, one per column: BLOCK_M + BLOCK_N integer divisions per tile, not one per element. Runs of D columns of a
row are contiguous in the output (coalesced stores). A tile's columns may straddle q / k / v: one masked store per
tensor, each skipped (a scalar branch) when no column of the tile is in that tensor.
"""

import functools

import torch
import triton
import triton.language as tl
from fastllm.kernels.triton._launch import device_ctx, dot_args, gpu_arch, m_bucket, mm_tile, tile_coords
from fastllm.kernels.triton.gemm import CPU_CONFIG, GROUP_M, _check_block, _config_list


@triton.jit
def _heads_store(OUT, acc, b, s, col, ok, j, h0, H, S, D):
    """Store the columns of acc whose head j is in [h0, h0 + H) into OUT (B, H, S, D) contiguous: row (b, s) (the
    (BLOCK_M,) vectors b, s) at (b H S + s) D, column col (head j) at (j - h0) S D + d, all int64."""
    d = col - j * D
    r_off = (b * H * S + s) * D  # (BLOCK_M,) int64
    c_off = (j - h0) * S * D + d  # (BLOCK_N,) int64 (negative where masked off)
    mask = ok & ((j >= h0) & (j < h0 + H))[None, :]
    tl.store(OUT + (r_off[:, None] + c_off[None, :]), acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _qkv_kernel(
    X, W, BIAS, Q, K_OUT, V,  # X (M, K) strided; W (N, K) strided; BIAS (N,); Q (B, Hq, S, D), K_OUT / V (B, Hkv, S, D)
    M, N, K, S, D, Hq, Hkv,
    stride_xm, stride_xk, stride_wk, stride_wn,
    M_BUCKET,  # autotune key only
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of y = X @ W.T + BIAS stored into the heads of q, k and v (module docstring)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    acc = mm_tile(
        X, W, m0, n0, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
        tl.float32, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # (BLOCK_M, BLOCK_N) fp32  # fmt: skip

    rm = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64 rows
    rn = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64 columns
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    b = rm // S  # (BLOCK_M,) batch and position of each row
    s = rm - b * S
    j = rn // D  # head of each column among the Hq + 2 Hkv
    n1 = n0 + BLOCK_N  # the tile's columns are [n0, n1)
    if n0 < Hq * D:
        _heads_store(Q, acc, b, s, rn, ok, j, 0, Hq, S, D)
    if (n0 < (Hq + Hkv) * D) & (n1 > Hq * D):
        _heads_store(K_OUT, acc, b, s, rn, ok, j, Hq, Hkv, S, D)
    if n1 > (Hq + Hkv) * D:
        _heads_store(V, acc, b, s, rn, ok, j, Hq + Hkv, Hkv, S, D)


# Autotune: gemm.py's _gemm_kernel lists (the same K loop; this epilogue is lighter than any of its epilogues), without
# their epilogue split. Key: M as a coarse bucket, N, K and the bias.
_TUNE_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS"]


@functools.cache
def _tuned(arch: int, fp32: bool):
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
        for m, n, k, w, s, _split in _config_list("_gemm_kernel", arch, fp32)
    ]
    return triton.autotune(configs=configs, key=_TUNE_KEY)(_qkv_kernel)


def _empty_heads(x: torch.Tensor, q_shape: tuple, kv_shape: tuple) -> tuple[torch.Tensor, ...]:
    """The new q, k, v (tests replace this to poison them and catch unwritten elements)."""
    return tuple(torch.empty(shape, dtype=x.dtype, device=x.device) for shape in (q_shape, kv_shape, kv_shape))


def qkv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, num_heads: int, num_kv_heads: int, *,
        block: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(q, k, v): x @ w.T + bias (fp32 accumulation, one rounding) split into heads, in the attention layout.

    x (B, S, hidden), w ((Hq + 2 Hkv) D, hidden) (torch.cat([Wq, Wk, Wv]), any strides), bias ((Hq + 2 Hkv) D,) or
    None, one dtype (float32 / bfloat16 / float16) and device; validated by the caller. q (B, Hq, S, D), k and v
    (B, Hkv, S, D): new contiguous tensors of x's dtype. block: test hook forcing (BLOCK_M, BLOCK_N, BLOCK_K), powers
    of two >= 16 (no autotuning).
    """
    B, S, K = x.shape
    N = w.shape[0]
    Hq, Hkv = num_heads, num_kv_heads
    D = N // (Hq + 2 * Hkv)
    q, k, v = _empty_heads(x, (B, Hq, S, D), (B, Hkv, S, D))
    M = B * S
    if M == 0 or N == 0:
        return q, k, v
    x2 = x.reshape(M, K)  # (M, K): a view when x's strides allow (the kernel takes any 2-D strides), else a copy
    args = (x2, w, bias, q, k, v, M, N, K, S, D, Hq, Hkv, *x2.stride(), w.stride(1), w.stride(0), m_bucket(M))
    consts = dict(HAS_BIAS=bias is not None, **dot_args(x))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with device_ctx(x):
        if x.is_cuda and block is None:
            _tuned(gpu_arch(x.device), x.dtype == torch.float32)[grid](*args, **consts)
            return q, k, v
        bm, bn, bk, _ = _check_block(block) if block is not None else (*CPU_CONFIG[:3], 1)
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M if x.is_cuda else CPU_CONFIG[3])
        _qkv_kernel[grid(tile)](*args, **consts, **tile, num_warps=4, num_stages=3 if x.is_cuda else 1)
    return q, k, v
