"""Int8 kernels in Triton (issue #5): per-row symmetric quantization, the int8 x int8 -> int32 GEMM with a
dequantizing epilogue (W8A8), and the weight-only int8 GEMM with 16-bit / fp32 activations (W8A16).

Semantics (the contract of fastllm.ops.int8; the caller has validated shapes, dtypes and devices):

    quantize_rows:  amax[m] = max_k |x[m, k]| (fp32, NaN if the row holds a NaN),
                    scale[m] = amax / 127 (1 where amax == 0; NaN / inf for a row with NaN / with inf and no NaN),
                    q[m, k] = clamp(round_half_even(x[m, k] / scale[m]), -127, 127)  (int8),
                              0 where x[m, k] / scale[m] is not finite (so q is always a number)
    int8_matmul:    acc = a_q @ b_q.T exactly in int32,  out = (acc * a_scale[m]) * b_scale[n] + bias[n]
    w8a16_matmul:   acc = x @ b_q.T in fp32 (int8 weights widened to x's dtype),  out = acc * b_scale[n] + bias[n]

Glossary
    M, N, K     the GEMM is (M, K) @ (K, N) -> (M, N); the weight b_q is (N, K) (nn.Linear layout), read as the
                (K, N) operand through its strides, never copied
    acc         the (BLOCK_M, BLOCK_N) accumulator tile of one program: int32 for int8 x int8, else fp32
    epilogue    what a program does with acc after its K loop, in fp32, each output rounded once to its dtype
    GROUP_M     tile-order swizzle: programs walk GROUP_M tile rows column by column, so that a wave of programs
                shares a few A row-blocks and B column-blocks in L2 (the "grouped ordering" of the Triton matmul
                tutorial; our own code)
    split-K     the small-M (decode) path: the K range is cut into SPLIT_K chunks of K_PER_SPLIT, one program per
                (column block, chunk), fp32 partial sums in a workspace, summed in a fixed order by a second kernel

Kernels
    _quantize_kernel    one program per BLOCK_R rows: pass 1 over K in BLOCK_K steps takes amax, pass 2 re-reads the
                        rows and stores q (ONE_TILE: K <= BLOCK_K, the rows stay in registers and are read once).
                        Division is IEEE (tl.div_rn; Triton's `/` on fp32 is an approximate division on NVIDIA), and
                        the clamped quotient is rounded half-to-even by adding and subtracting 1.5 * 2^23 (exact for
                        |v| < 2^22 in round-to-nearest-even fp32; the clamp to [-127, 127] comes first, which gives
                        the same result as the reference's round-then-clamp since the bounds are integers; a
                        non-finite quotient is set to 0 before). No libdevice: the same code runs under the
                        interpreter (checked in the sm_80 / sm_90 SASS: the two FADDs survive, the int8 store
                        converts an exact integer).
                        The row max is a tl.reduce with tl.maximum(propagate_nan=ALL): tl.max's default maximum
                        returns the non-NaN operand on GPU, which would hide a NaN behind a finite scale.
    _gemm_kernel        one program per (BLOCK_M, BLOCK_N) output tile, 1-D grid in grouped order. W8A16 = False:
                        tl.dot of int8 tiles into an int32 accumulator (IMMA mma.sync on sm_80, wgmma on sm_90),
                        then the epilogue acc.to(fp32) * a_scale[m] * b_scale[n] + bias[n]. W8A16 = True: the int8
                        weight tile is widened to x's dtype inside the K loop (exact: |v| <= 128 is a bfloat16 /
                        float16), tl.dot with fp32 accumulation (input_precision="ieee" for fp32 x), then
                        acc * b_scale[n] + bias[n].
    _splitk_kernel      W8A16 for M <= SMALL_M (decode): BLOCK_M = 16 covers every row, a 2-D grid (column blocks,
                        K chunks) so that M = 1 with N = K = 4096 still fills the GPU (about 4 programs per SM).
                        DIRECT (one chunk): the epilogue runs here and writes out; else the fp32 partial tile goes
                        to WS[chunk] (SPLIT_K, M, N).
    _splitk_reduce_kernel   out = (sum over chunks 0, 1, ... of WS) * b_scale[n] + bias[n], one program per
                        (row, BLOCK columns): a fixed summation order, so results do not depend on scheduling.

Masks and offsets as in gemm.py: rows >= M, columns >= N and the K tail load 0 and are never stored, so any M, N, K
work (K = 0: acc = 0 and the epilogue still runs). K-loop offsets are int64 before they meet a stride; the epilogue
addresses a tile from its int64 corner plus int32 in-tile offsets (outputs are contiguous, BLOCK * N < 2^31).

Exactness. The int32 accumulator is exact for K < 2^31 / 2^14 = 131072 (|a * b| <= 2^14). Its conversion to fp32
rounds once where |acc| > 2^24, as the contract says (acc.to(fp32)). On GPU the epilogue's last multiply and the bias
add may be contracted into one FMA (Triton's default enable_fp_fusion), i.e. one rounding fewer than the
interpreter's; both are within the tests' few-ulp tolerance.

Block sizes. On CUDA the GEMMs are autotuned (triton.autotune) over a short list per architecture (sm_90, sm_80;
older GPUs use sm_80's, newer sm_90's) and per dot kind (int8 IMMA, 16-bit MMA, fp32 FMA), keyed on a coarse bucket
of M, N, K and the flags. Under the interpreter (CPU tensors, TRITON_INTERPRET=1) one fixed small config is used;
tests may force tiles with block=... and the split with k_per_split=...

Interpreter notes (TRITON_INTERPRET=1). tl.dot of int8 tiles is np.matmul(..., dtype=int32), which widens before
multiplying (exact; checked by the tests with -128 * -128 sums). The interpreter's tl.dot multiplies bfloat16 tiles
as raw 16-bit integer patterns, so there (only) W8A16 widens the bfloat16 x tile and the int8 tile to fp32 before the
dot (constexpr DOT_UPCAST; exact). Its fp32 -> bfloat16 casts round toward zero (compiled code rounds to nearest
even), so bfloat16 outputs may differ from a GPU run in the last bit.
"""

import functools

import torch
import triton
import triton.language as tl
from fastllm.kernels.triton._launch import (
    as_int64,
    device_ctx,
    dot_args,
    gpu_arch,
    m_bucket,
    mm_tile,
    sm_count,
    tile_coords,
)

# M up to which w8a16_matmul takes the split-K path (the BLOCK_M of _splitk_kernel).
SMALL_M = 16
# Split-K granularity: K_PER_SPLIT is a multiple of this (and of every BLOCK_K of the split lists).
K_SPLIT_UNIT = 256
# Tile-order group on CUDA (the Triton tutorial's value).
GROUP_M = 8
# Interpreter (CPU tensors): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) of _gemm_kernel per mode; int8 dots need
# BLOCK_K >= 32 when compiled, kept here too. GROUP_M = 2 so that test shapes see full and partial groups.
CPU_CONFIG = {"int8": (16, 16, 32, 2), "w8a16": (16, 16, 16, 2)}
# Interpreter: (BLOCK_N, BLOCK_K) of _splitk_kernel, the K chunk, the reduce block, quantize's (BLOCK_R, BLOCK_K).
CPU_SPLIT_CONFIG = (16, 16)
CPU_K_PER_SPLIT = 32
CPU_REDUCE_BLOCK = 16
CPU_QUANT_BLOCK = (4, 128)

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + c - c rounds v half-to-even for |v| < 2^22
_INF = tl.constexpr(float("inf"))


# --------------------------------------------------------------------------------------------------
# Shared pieces (the grouped tile order and the K loop, mm_tile, come from _launch.py).


@triton.jit
def _epilogue(
    acc, C, A_SCALE, B_SCALE, BIAS, m0, n0, M, N,  # m0, n0: int64 corner of the tile
    HAS_A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """C[m, n] = (acc * A_SCALE[m]) * B_SCALE[n] + BIAS[n] in fp32 (A_SCALE only when HAS_A_SCALE), rounded once to
    C's dtype; C contiguous (M, N)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M - m0
    n_ok = rn < N - n0
    y = acc.to(tl.float32)
    if HAS_A_SCALE:
        y = y * tl.load(A_SCALE + m0 + rm, mask=m_ok, other=0.0)[:, None]
    y = y * tl.load(B_SCALE + n0 + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + n0 + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = (C + (m0 * N + n0)) + (rm[:, None] * N + rn[None, :])
    tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _max_nan(a, b):
    """max(a, b) with NaN winning (tl.maximum's default, and so tl.max on GPU, returns the non-NaN operand)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax(x):
    """max |x| along axis 1 of a (BLOCK_R, BLOCK_K) fp32 tile, NaN if the row holds one: (BLOCK_R,)."""
    return tl.reduce(tl.abs(x), 1, _max_nan)


@triton.jit
def _scale(amax):
    """amax / 127 (IEEE division), 1 where amax == 0; NaN / inf amax gives a NaN / inf scale."""
    return tl.where(amax == 0.0, 1.0, tl.div_rn(amax, 127.0))


@triton.jit
def _quantize_tile(x, scale):
    """q = clamp(round_half_even(x / scale), -127, 127) of a (BLOCK_R, BLOCK_K) fp32 tile and its (BLOCK_R,) scales,
    0 where x / scale is not finite (a NaN / inf row: the non-finite value lives in the scale). The clamp comes first
    (same result as round-then-clamp: the bounds are integers), so the magic-number rounding sees |v| <= 127."""
    v = tl.div_rn(x, scale[:, None])
    v = tl.where(tl.abs(v) < _INF, v, 0.0)
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return ((v + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int8)


# --------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _quantize_kernel(
    X, Q, S,  # X (M, K) strided; Q (M, K) int8 contiguous; S (M,) fp32
    M, K, stride_xm, stride_xk,
    ONE_TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows [pid * BLOCK_R, +BLOCK_R) of q, scale = quantize_rows(x) (module docstring)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) int64
    r_ok = rows < M
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = X + rows[:, None] * stride_xm  # (BLOCK_R, 1)
    q_rows = Q + rows[:, None] * K
    if ONE_TILE:  # K <= BLOCK_K: one read
        ok = r_ok[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_rows + offs_k.to(tl.int64)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
        scale = _scale(_row_amax(x))
        tl.store(q_rows + offs_k[None, :], _quantize_tile(x, scale), mask=ok)
    else:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            ok = r_ok[:, None] & (ks < K)[None, :]
            x = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
            amax = _max_nan(amax, _row_amax(x))
        scale = _scale(amax)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            ok = r_ok[:, None] & (ks < K)[None, :]
            x = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
            tl.store(q_rows + ks[None, :], _quantize_tile(x, scale), mask=ok)
    tl.store(S + rows, scale, mask=r_ok)


@triton.jit
def _gemm_kernel(
    A, B, C, A_SCALE, B_SCALE, BIAS,  # A (M, K), B (K, N) strided (b_q.T); C (M, N) contiguous; scales, BIAS (M,) (N,)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    M_BUCKET,  # autotune key only
    W8A16: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile: W8A16 False: int32 acc = A @ B of int8 tiles, C = acc * A_SCALE * B_SCALE + BIAS;
    W8A16 True: fp32 acc = A @ float(B), C = acc * B_SCALE + BIAS (A_SCALE unused)."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0, n0 = pid_m.to(tl.int64) * BLOCK_M, pid_n.to(tl.int64) * BLOCK_N
    acc_dtype: tl.constexpr = tl.float32 if W8A16 else tl.int32
    acc = mm_tile(
        A, B, m0, n0, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        acc_dtype, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # (BLOCK_M, BLOCK_N)  # fmt: skip
    _epilogue(acc, C, A_SCALE, B_SCALE, BIAS, m0, n0, M, N, not W8A16, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _splitk_kernel(
    X, B, WS, C, B_SCALE, BIAS,  # X (M, K), B (K, N) strided (b_q.T); WS (SPLIT_K, M, N) fp32; C (M, N) contiguous
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_bk, stride_bn,
    DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Columns [pid_n * BLOCK_N, +BLOCK_N) of every row (M <= BLOCK_M), summed over the K chunk
    [pid_k * K_PER_SPLIT, +K_PER_SPLIT) in fp32: the epilogue into C when DIRECT (one chunk), else into WS[pid_k]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n.to(tl.int64) * BLOCK_N
    k_start = as_int64(pid_k) * K_PER_SPLIT
    k_len = tl.minimum(K - pid_k * K_PER_SPLIT, K_PER_SPLIT)  # this chunk's length
    acc = mm_tile(
        X + k_start * stride_xk, B + k_start * stride_bk, as_int64(0), n0, M, N, k_len,
        stride_xm, stride_xk, stride_bk, stride_bn, tl.float32, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # (BLOCK_M, BLOCK_N) fp32  # fmt: skip
    if DIRECT:
        _epilogue(acc, C, B_SCALE, B_SCALE, BIAS, as_int64(0), n0, M, N, False, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        ws = (WS + (pid_k.to(tl.int64) * M * N + n0)) + (rm[:, None] * N + rn[None, :])
        tl.store(ws, acc, mask=(rm < M)[:, None] & (rn < N - n0)[None, :])


@triton.jit
def _splitk_reduce_kernel(
    WS, C, B_SCALE, BIAS,  # WS (SPLIT_K, M, N) fp32; C (M, N) contiguous
    M, N, SPLIT_K,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """C[m, n] = (WS[0, m, n] + WS[1, m, n] + ... in that order) * B_SCALE[n] + BIAS[n] for row m = program_id(0)
    and BLOCK columns from program_id(1) * BLOCK."""
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = rn < N
    row = tl.program_id(0).to(tl.int64) * N
    split_stride = as_int64(M) * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(WS + (s * split_stride + row) + rn, mask=ok, other=0.0)
    y = acc * tl.load(B_SCALE + rn, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(C + row + rn, y.to(C.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launchers.

# Autotune lists (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), GROUP_M = 8, per architecture and dot kind.
# Not yet timed on a GPU; checked by offline compiles (triton.compile for sm_80 / sm_90 with Triton's ptxas).
#   int8 (IMMA): BLOCK_K = 128 bytes of a K-contiguous row on sm_90 (wgmma reads int8 operands K-major, which both
#   a_q and the nn.Linear-layout b_q are), 64 on sm_80 (mma.sync m16n8k32) plus one 128. A 128 x 256 x 128 int8 stage
#   is 48 KiB. The 32-row config is for small M.
#   16-bit W8A16: as gemm.py's 16-bit lists (the int8 weight tile is half the bytes of a 16-bit one).
#   fp32 W8A16 (FMA dot, no tensor cores): each thread holds its rows' / columns' whole BLOCK_K slices of both
#   operands, so small tiles and 8 warps: 64 x 64 x 32 at 4 warps spilled 330 bytes per thread on both
#   architectures, 64 x 64 x 32 at 8 warps uses 196 registers and no stack. The same list on both architectures.
_GEMM_CONFIGS = {
    ("int8", 90): [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (64, 128, 128, 4, 4),
                   (128, 64, 128, 4, 4), (32, 64, 256, 4, 4)],
    ("int8", 80): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
                   (128, 64, 64, 4, 4), (32, 64, 128, 4, 4)],
    ("mma", 90): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
                  (128, 64, 64, 4, 4), (64, 64, 128, 4, 4)],
    ("mma", 80): [(128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4),
                  (128, 64, 32, 4, 4), (64, 64, 64, 4, 4)],
    ("fma", 90): [(64, 64, 32, 8, 3), (128, 64, 16, 8, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3)],
    ("fma", 80): [(64, 64, 32, 8, 3), (128, 64, 16, 8, 3), (64, 64, 16, 4, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3)],
}  # fmt: skip
# Split-K (decode) lists (BLOCK_N, BLOCK_K, num_warps, num_stages), BLOCK_M = SMALL_M; BLOCK_K divides K_SPLIT_UNIT.
# The weight is streamed once, so the aim is enough bytes in flight per SM: BLOCK_N x BLOCK_K int8 tiles of 8-32 KiB
# over 3-5 stages (mma.sync with 16 rows on both architectures: wgmma needs 64); fp32 x: FMA, small tiles as for
# the tiled list. K_PER_SPLIT is a multiple of K_SPLIT_UNIT, so the JIT sees it divisible by 16 and the chunk's loads
# stay vectorized and pipelined (cp.async): compiled with K_PER_SPLIT of unknown alignment, the loop was not
# pipelined at all.
_SPLIT_CONFIGS = {
    ("mma", 90): [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (32, 256, 4, 4), (128, 64, 8, 4),
                  (128, 256, 8, 3)],
    ("mma", 80): [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 256, 4, 4), (128, 64, 4, 4),
                  (32, 128, 4, 5)],
    ("fma", 90): [(64, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 4), (32, 64, 4, 3), (32, 32, 4, 4)],
    ("fma", 80): [(64, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 4), (32, 64, 4, 3), (32, 32, 4, 4)],
}  # fmt: skip
# Split-K aims at this many programs per SM (with BLOCK_N = 64).
_SPLIT_WAVES = 4
_REDUCE_BLOCK = 1024


def _kind(dtype: torch.dtype) -> str:
    return {torch.int8: "int8", torch.float32: "fma"}.get(dtype, "mma")


@functools.cache
def _tuned_gemm(kind: str, arch: int):
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M}, num_warps=w, num_stages=s)
        for m, n, k, w, s in _GEMM_CONFIGS[(kind, arch)]
    ]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "W8A16", "HAS_BIAS"])(_gemm_kernel)


@functools.cache
def _tuned_splitk(kind: str, arch: int):
    configs = [
        triton.Config({"BLOCK_M": SMALL_M, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in _SPLIT_CONFIGS[(kind, arch)]
    ]
    return triton.autotune(configs=configs, key=["N", "K", "K_PER_SPLIT", "DIRECT", "HAS_BIAS"])(_splitk_kernel)


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D scale / bias with unit stride (the kernels index them as contiguous; a copy only for a strided view)."""
    return None if t is None else t.contiguous()


def _pow2(b: int) -> bool:
    return b >= 16 and not b & (b - 1)


def _launch_gemm(M: int, N: int, args: tuple, consts: dict, t: torch.Tensor, block) -> None:
    """_gemm_kernel over the (M, N) output tiles: autotuned on CUDA unless block = (BLOCK_M, BLOCK_N, BLOCK_K) is
    forced; CPU_CONFIG (or block) elsewhere. t: the A operand (its dtype picks the list)."""
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    kind = _kind(t.dtype)
    with device_ctx(t):
        if t.is_cuda and block is None:
            _tuned_gemm(kind, gpu_arch(t.device))[grid](*args, **consts)
            return
        if block is not None:
            if len(block) != 3 or not all(_pow2(b) for b in block) or (kind == "int8" and block[2] < 32):
                raise ValueError(f"int8: block must be 3 powers of two >= 16 (BLOCK_K >= 32 for int8), got {block}")
            bm, bn, bk = block
        else:
            bm, bn, bk, _ = CPU_CONFIG["int8" if kind == "int8" else "w8a16"]
        group = GROUP_M if t.is_cuda else CPU_CONFIG["int8"][3]
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group)
        _gemm_kernel[grid(tile)](*args, **consts, **tile, num_warps=4, num_stages=3 if t.is_cuda else 1)


def quantize_rows(x: torch.Tensor, *, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): symmetric per-row int8 quantization of x (M, K) (fp32 / bf16 / fp16, any strides).

    scale[m] = max|x[m]| / 127 in fp32 (1.0 for an all-zero row), q = clamp(round_half_even(x / scale), -127, 127),
    bit-exact with torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8). q is a new contiguous
    (M, K) int8 tensor, scale a new (M,) fp32 tensor. block: test hook forcing (BLOCK_R, BLOCK_K), powers of two
    (BLOCK_R >= 1, BLOCK_K >= 16).
    """
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, scale
    if K == 0:
        return q, scale.fill_(1.0)
    if block is not None:
        br, bk = block
        if br < 1 or br & (br - 1) or not _pow2(bk):
            raise ValueError(f"int8: quantize block must be (BLOCK_R, BLOCK_K) powers of two, got {block}")
    elif x.is_cuda:
        bk = min(max(triton.next_power_of_2(K), 16), 4096)  # K <= 4096: one read of x (ONE_TILE)
        br = max(1, min(16, 4096 // bk, triton.next_power_of_2(M)))
    else:
        br, bk = CPU_QUANT_BLOCK
    warps = 8 if br * bk >= 4096 else 4
    with device_ctx(x):
        _quantize_kernel[(triton.cdiv(M, br),)](
            x, q, scale, M, K, *x.stride(), ONE_TILE=bk >= K, BLOCK_R=br, BLOCK_K=bk, num_warps=warps
        )
    return q, scale


def int8_matmul(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    *,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """out = (acc * a_scale[m]) * b_scale[n] + bias[n] with acc = a_q @ b_q.T exact in int32, in fp32, rounded once.

    a_q (M, K) int8, b_q (N, K) int8 (nn.Linear layout), any strides; a_scale (M,), b_scale (N,) fp32; bias (N,) of
    out_dtype or None (a strided 1-D scale or bias is copied to unit stride); out_dtype fp32 / bf16 / fp16. out is a
    new contiguous (M, N) tensor of out_dtype. block: test hook forcing (BLOCK_M, BLOCK_N, BLOCK_K), powers of two
    >= 16 with BLOCK_K >= 32 (no autotuning).
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return out
    a_scale, b_scale, bias = _vec(a_scale), _vec(b_scale), _vec(bias)
    args = (a_q, b_q, out, a_scale, b_scale, bias, M, N, K, *a_q.stride(), b_q.stride(1), b_q.stride(0), m_bucket(M))
    consts = dict(W8A16=False, HAS_BIAS=bias is not None, DOT_PRECISION="ieee", DOT_UPCAST=False)
    _launch_gemm(M, N, args, consts, a_q, block)
    return out


def _split_plan(N: int, K: int, x: torch.Tensor, k_per_split: int | None) -> tuple[int, int]:
    """(SPLIT_K, K_PER_SPLIT) of the split-K path: about _SPLIT_WAVES programs per SM at BLOCK_N = 64, chunks a
    multiple of K_SPLIT_UNIT (CPU_K_PER_SPLIT under the interpreter); k_per_split: test hook."""
    if k_per_split is None:
        if x.is_cuda:
            sms = sm_count(x.device)
            units = triton.cdiv(K, K_SPLIT_UNIT)
            split = max(1, min(units, triton.cdiv(_SPLIT_WAVES * sms, triton.cdiv(N, 64))))
            k_per_split = triton.cdiv(units, split) * K_SPLIT_UNIT
        else:
            k_per_split = CPU_K_PER_SPLIT
    elif k_per_split < 1:
        raise ValueError(f"int8: k_per_split must be positive, got {k_per_split}")
    return max(1, triton.cdiv(K, k_per_split)), k_per_split


def w8a16_matmul(
    x: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    small_m: bool | None = None,
    block: tuple[int, ...] | None = None,
    k_per_split: int | None = None,
) -> torch.Tensor:
    """out = acc * b_scale[n] + bias[n] with acc = x @ float(b_q).T accumulated in fp32; out in x's dtype.

    x (M, K) fp32 / bf16 / fp16, b_q (N, K) int8, any strides; b_scale (N,) fp32; bias (N,) of x's dtype or None
    (a strided 1-D scale or bias is copied to unit stride).
    out is a new contiguous (M, N) tensor of x's dtype, rounded once from fp32. M <= SMALL_M takes the split-K path
    (_splitk_kernel, then _splitk_reduce_kernel when K spans several chunks), larger M the tiled GEMM. Test hooks:
    small_m forces the path; block forces (BLOCK_M, BLOCK_N, BLOCK_K) of the tiled path or (BLOCK_N, BLOCK_K) of the
    split path; k_per_split forces the split-K chunk.
    """
    M, K = x.shape
    N = b_q.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    b_scale, bias = _vec(b_scale), _vec(bias)
    if small_m is None:
        small_m = M <= SMALL_M
    if not small_m:
        args = (x, b_q, out, None, b_scale, bias, M, N, K, *x.stride(), b_q.stride(1), b_q.stride(0), m_bucket(M))
        _launch_gemm(M, N, args, dict(W8A16=True, HAS_BIAS=bias is not None, **dot_args(x)), x, block)
        return out
    if M > SMALL_M:
        raise ValueError(f"int8: the split-K path takes M <= {SMALL_M}, got {M}")
    split, kps = _split_plan(N, K, x, k_per_split)
    direct = split == 1
    ws = out if direct else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    args = (x, b_q, ws, out, b_scale, bias, M, N, K, kps, *x.stride(), b_q.stride(1), b_q.stride(0))
    consts = dict(DIRECT=direct, HAS_BIAS=bias is not None, **dot_args(x))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)
    with device_ctx(x):
        if x.is_cuda and block is None:
            _tuned_splitk(_kind(x.dtype), gpu_arch(x.device))[grid](*args, **consts)
        else:
            if block is not None and (len(block) != 2 or not all(_pow2(b) for b in block)):
                raise ValueError(f"int8: split-K block must be (BLOCK_N, BLOCK_K), powers of two >= 16, got {block}")
            bn, bk = block if block is not None else CPU_SPLIT_CONFIG
            tile = dict(BLOCK_M=SMALL_M, BLOCK_N=bn, BLOCK_K=bk)
            _splitk_kernel[grid(tile)](*args, **consts, **tile, num_warps=4, num_stages=3 if x.is_cuda else 1)
        if not direct:
            rb = _REDUCE_BLOCK if x.is_cuda else CPU_REDUCE_BLOCK
            _splitk_reduce_kernel[(M, triton.cdiv(N, rb))](
                ws, out, b_scale, bias, M, N, split, HAS_BIAS=bias is not None, BLOCK=rb, num_warps=4
            )
    return out
