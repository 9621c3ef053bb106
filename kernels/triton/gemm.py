"""Fused linear / FFN GEMMs in Triton: linear with bias + activation + residual epilogue, the gated (GLU) FFN
projection in one kernel, and the backward matmuls with activation-gradient epilogues.

Semantics (the contract of fastllm.ops; the caller has validated shapes, dtypes and devices):

    linear:  pre = x @ w.T + bias,  y = act(pre) + residual
    gated:   g = x @ wg.T + bg,  u = x @ wu.T + bu,  h = act(g) * u
    matmul:  acc = a @ b, then  "none": c = acc
                                "dact": c = acc * act'(aux)
                                "dgated": c = acc * u * act'(g), c2 = acc * act(g)   (aux = g, aux2 = u)

Glossary
    M, N, K     the GEMM is (M, K) @ (K, N) -> (M, N); for linear / gated, x is (M, K) and the weights are
                (N, K) (nn.Linear layout), read as the (K, N) operand through their strides, never copied
    acc         the (BLOCK_M, BLOCK_N) fp32 accumulator tile of one program
    act, act'   an activation of ACTIVATIONS and its derivative (see _act / _act_grad):
                gelu(x) = 0.5 x (1 + erf(x / sqrt 2)),  gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x sigmoid(2 z) with
                z = sqrt(2 / pi) (x + 0.044715 x^3),  quick_gelu(x) = x sigmoid(1.702 x),  relu,  silu(x) = x sigmoid(x)
    epilogue    what a program does with acc after its K loop, all in fp32, each output rounded once to its dtype
    GROUP_M     tile-order swizzle: programs walk GROUP_M tile rows column by column, so that a wave of programs
                shares a few A row-blocks and B column-blocks in L2 (the "grouped ordering" of the Triton matmul
                tutorial; our own code)
    EPI_SPLIT   the epilogue runs on 1, 2 or 4 column slices of the tile, one after another (_halves splits a
                tile in two; the "epilogue sub-tiling" of Triton's persistent-matmul tutorial): fewer epilogue
                values are live at once, so big tiles with heavy epilogues do not spill (see _MMA_CONFIGS)

Kernels (one program per (BLOCK_M, BLOCK_N) output tile, 1-D grid in grouped order)
    _gemm_kernel    acc = A @ B over K in BLOCK_K steps, then one of three epilogues (constexpr EPILOGUE):
                    "linear"  acc + bias -> (store pre) -> act -> + aux -> store. This covers linear (aux = the
                              residual) and matmul mode "none" (no bias / act).
                    "dact"    acc * act'(aux)
                    "dgated"  acc * aux2 * act'(aux) and acc * act(aux) (two outputs)
                    (_gemm_epilogue, once per EPI_SPLIT slice)
    _gated_kernel   the gated FFN projection: each K step loads the x tile once and both weight tiles, and
                    accumulates the gate and up tiles side by side in two fp32 accumulators; the epilogue adds the
                    biases, optionally stores g and u, and stores h = act(g) * u (_gated_epilogue, once per
                    EPI_SPLIT slice). No (M, 2N) intermediate exists.

Masks. Rows >= M, columns >= N and the K tail (k >= K) load 0 and are never stored, so any M, N, K work (K = 0
gives acc = 0 and the epilogue still runs). The masks are row / column / k predicates, constant along the other
axis, so an operand that is contiguous along K (or along M / N, for transposed views such as dy.T) still gets
vector loads when the JIT knows K (or M, N) to be a multiple of 16.

Offsets. In the K loop, row, column and k offsets are int64 before they meet a stride (M * stride overflows int32
on large activations, and a transposed view has stride M along K), and so is the per-step pointer increment
BLOCK_K * stride_k. The epilogue addresses a tile from its int64 corner plus int32 in-tile offsets (_tile_ptrs),
which assumes BLOCK * stride < 2^31 for the outputs (row stride N) and the aux / residual tensors, i.e. strides
below 2^23. Outputs are contiguous (M, N).

Precision. tl.dot with fp32 accumulation: 16-bit inputs use tensor cores (mma / wgmma); fp32 inputs use
input_precision="ieee" (FMA, no TF32 rounding of the inputs), so an fp32 GEMM is an fp32 GEMM like torch's default
(torch.backends.cuda.matmul.allow_tf32 = False). The epilogue is fp32: bias, residual and aux are widened, the
activation (erf from libdevice, exp for the sigmoids, IEEE division) is fp32, and each output is rounded once.
gelu_tanh is computed as x * sigmoid(2 z) (the same function without 1 + tanh(z)'s cancellation for z << 0), and
the derivatives take 1 - sigmoid(t) as sigmoid(-t) (no cancellation for large t): measured against float64 on
[-8, 8] in fp32, the derivatives are 1.3-6x more accurate than torch's own backward formulas and the activations
within 1.3x of torch's.

Block sizes. On CUDA the kernels are autotuned (triton.autotune) over a short list per architecture (sm_90
Hopper, sm_80 Ampere; other GPUs use the list of the closest older one) and per dot kind (16-bit tensor-core MMA,
fp32 FMA), keyed on a coarse bucket of M (the token count varies from call to call), N, K, the epilogue and the
dtypes; configs that do not fit a GPU's shared memory are skipped by the autotuner. Under
the interpreter (CPU tensors, TRITON_INTERPRET=1) one fixed small config is used (CPU_CONFIG). Tests may force the
tile with block=(BLOCK_M, BLOCK_N, BLOCK_K[, EPI_SPLIT]) to get several tiles, K steps and epilogue slices on tiny
shapes. A persistent variant (one program per SM looping over tiles) is not implemented.

Interpreter notes (TRITON_INTERPRET=1). The interpreter's tl.dot multiplies bfloat16 tiles as their raw 16-bit
integer patterns, so there (only) the tiles are widened to fp32 before each dot (constexpr DOT_UPCAST; exact, every
bfloat16 is an fp32). Its fp32 -> bfloat16 casts round toward zero (compiled code rounds to nearest even), so
bfloat16 outputs may differ from a GPU run in the last bit.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from fastllm.kernels.triton._launch import (
    as_int64,
    device_ctx,
    dot_acc,
    dot_args,
    gpu_arch,
    m_bucket,
    mm_tile,
    tile_coords,
)

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu", "relu", "silu")
GATED_ACTIVATIONS = ACTIVATIONS[1:]
MATMUL_MODES = ("none", "dact", "dgated")

_SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TANH_C = tl.constexpr(math.sqrt(2.0 / math.pi))  # gelu_tanh: z = _TANH_C * (x + _TANH_K * x^3)
_TANH_K = tl.constexpr(0.044715)
_QUICK_C = tl.constexpr(1.702)

# Interpreter (CPU tensors): (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M). GROUP_M = 2 so that test shapes of a few tiles
# see full and partial groups.
CPU_CONFIG = (16, 16, 16, 2)
# Tile-order group on CUDA (the Triton tutorial's value).
GROUP_M = 8


# --------------------------------------------------------------------------------------------------
# Shared pieces.


@triton.jit
def _sigmoid(x):
    """1 / (1 + exp(-x)) in fp32 with an IEEE division: exp(-x) = inf for x << 0 gives exactly 0, no NaN."""
    return tl.div_rn(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _act(x, ACT: tl.constexpr):
    """act(x), x fp32."""
    if ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == "gelu_tanh":
        y = x * _sigmoid(2.0 * _TANH_C * (x + _TANH_K * x * x * x))  # 0.5 (1 + tanh z) = sigmoid(2 z)
    elif ACT == "quick_gelu":
        y = x * _sigmoid(_QUICK_C * x)
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    elif ACT == "silu":
        y = x * _sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """act'(x), x fp32. With s the sigmoid of each form and s1 = 1 - s computed as the sigmoid of the negated
    argument (1 - s itself would cancel for large arguments, where x s1 still matters):
    gelu: Phi(x) + x phi(x);  gelu_tanh: s + 2 c x s s1 (1 + 3 k x^2) with s = sigmoid(2 z) (1 - tanh^2 z = 4 s s1);
    quick_gelu: s + 1.702 x s s1;  silu: s (1 + x s1);  relu: 1 where x > 0 else 0."""
    if ACT == "gelu":
        d = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == "gelu_tanh":
        t = 2.0 * _TANH_C * (x + _TANH_K * x * x * x)
        s = _sigmoid(t)
        d = s + 2.0 * _TANH_C * x * s * _sigmoid(-t) * (1.0 + 3.0 * _TANH_K * x * x)
    elif ACT == "quick_gelu":
        t = _QUICK_C * x
        s = _sigmoid(t)
        d = s + t * s * _sigmoid(-t)
    elif ACT == "relu":
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == "silu":
        s = _sigmoid(x)
        d = s * (1.0 + x * _sigmoid(-x))
    else:
        d = tl.zeros_like(x) + 1.0
    return d


@triton.jit
def _tile_ptrs(PTR, m0, n0, stride_m, stride_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pointers (BLOCK_M, BLOCK_N) to the tile at (m0, n0) (int64 scalars) of a strided matrix: the tile's corner in
    int64, the in-tile offsets in int32 (BLOCK * stride < 2^31), which keeps the epilogue's address tiles at one
    register per element where the compiler materializes them."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    return (PTR + (m0 * stride_m + n0 * stride_n)) + (rm[:, None] * stride_m + rn[None, :] * stride_n)


# --------------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a (BLOCK_M, BLOCK_N) tile (the persistent-matmul tutorial's epilogue
    sub-tiling: storing a tile in slices keeps fewer epilogue values live at once)."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _slice(acc, j: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column slice j of SPLIT (1, 2 or 4) of a (BLOCK_M, BLOCK_N) tile: (BLOCK_M, BLOCK_N // SPLIT). The halves of
    one tile computed for several slices are the same values (the compiler keeps one copy)."""
    if SPLIT == 1:
        part = acc
    else:
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        if j * 2 < SPLIT:
            part = left
        else:
            part = right
        if SPLIT == 4:
            left, right = _halves(part, BLOCK_M, BLOCK_N // 2)
            if j % 2 == 0:
                part = left
            else:
                part = right
    return part


@triton.jit
def _gemm_epilogue(
    acc, n0, n_left,  # acc: the (BLOCK_M, BLOCK_N) fp32 tile at (m0, n0) of the output; n_left = N - n0
    C, C2, BIAS, AUX, AUX2, m0, m_left, N,  # m_left = M - m0 (int32)
    stride_xm, stride_xn, stride_x2m, stride_x2n,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr,
    SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The EPILOGUE of _gemm_kernel on one output tile (C, C2 contiguous, row stride N; see the kernel)."""
    rn = tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_M) < m_left)[:, None] & (rn < n_left)[None, :]
    c_ptrs = _tile_ptrs(C, m0, n0, N, 1, BLOCK_M, BLOCK_N)
    if EPILOGUE == "linear":
        if HAS_BIAS:
            acc += tl.load(BIAS + n0 + rn, mask=rn < n_left, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE:
            tl.store(_tile_ptrs(C2, m0, n0, N, 1, BLOCK_M, BLOCK_N), acc.to(C2.dtype.element_ty), mask=ok)
        y = _act(acc, ACT)
        if HAS_AUX:
            x_ptrs = _tile_ptrs(AUX, m0, n0, stride_xm, stride_xn, BLOCK_M, BLOCK_N)
            y += tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=ok)
    elif EPILOGUE == "dact":
        pre = tl.load(_tile_ptrs(AUX, m0, n0, stride_xm, stride_xn, BLOCK_M, BLOCK_N), mask=ok, other=0.0)
        tl.store(c_ptrs, (acc * _act_grad(pre.to(tl.float32), ACT)).to(C.dtype.element_ty), mask=ok)
    else:  # "dgated"
        g = tl.load(_tile_ptrs(AUX, m0, n0, stride_xm, stride_xn, BLOCK_M, BLOCK_N), mask=ok, other=0.0)
        u = tl.load(_tile_ptrs(AUX2, m0, n0, stride_x2m, stride_x2n, BLOCK_M, BLOCK_N), mask=ok, other=0.0)
        g = g.to(tl.float32)
        tl.store(c_ptrs, (acc * u.to(tl.float32) * _act_grad(g, ACT)).to(C.dtype.element_ty), mask=ok)
        c2_ptrs = _tile_ptrs(C2, m0, n0, N, 1, BLOCK_M, BLOCK_N)
        tl.store(c2_ptrs, (acc * _act(g, ACT)).to(C2.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(
    A, B, C, C2, BIAS, AUX, AUX2,  # A (M, K), B (K, N) strided; C, C2 (M, N) contiguous; BIAS (N,); AUX, AUX2 (M, N)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_xm, stride_xn, stride_x2m, stride_x2n,  # AUX, AUX2
    M_BUCKET,  # autotune key only
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_AUX: tl.constexpr,
    SAVE_PRE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of acc = A @ B (fp32), then the EPILOGUE (module docstring):
    "linear": pre = acc + BIAS; C2 = pre (SAVE_PRE); C = act(pre) + AUX (HAS_AUX; AUX may be C itself, fp32).
    "dact":   C = acc * act'(AUX).
    "dgated": C = acc * AUX2 * act'(AUX), C2 = acc * act(AUX).
    """
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    acc = mm_tile(
        A, B, m0, n0, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        tl.float32, DOT_PRECISION, DOT_UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # (BLOCK_M, BLOCK_N) fp32  # fmt: skip

    # epilogue, on EPI_SPLIT column slices of the tile one after another (fewer values live at once)
    m_left = M - pid_m * BLOCK_M
    n_left = N - pid_n * BLOCK_N
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    for j in tl.static_range(EPI_SPLIT):
        _gemm_epilogue(
            _slice(acc, j, EPI_SPLIT, BLOCK_M, BLOCK_N), n0 + j * SUB_N, n_left - j * SUB_N, C, C2, BIAS, AUX, AUX2,
            m0, m_left, N, stride_xm, stride_xn, stride_x2m, stride_x2n, EPILOGUE, ACT, HAS_BIAS, HAS_AUX, SAVE_PRE,
            BLOCK_M, SUB_N,
        )  # fmt: skip


@triton.jit
def _gated_epilogue(
    acc_g, acc_u, n0, n_left,  # the (BLOCK_M, BLOCK_N) fp32 gate / up tiles at (m0, n0); n_left = N - n0
    H, G, U, BG, BU, m0, m_left, N,  # m_left = M - m0 (int32)
    ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Biases, g and u (SAVE_PRE), h = act(g) * u on one output tile of _gated_kernel (contiguous outputs)."""
    rn = tl.arange(0, BLOCK_N)
    ok = (tl.arange(0, BLOCK_M) < m_left)[:, None] & (rn < n_left)[None, :]
    if HAS_BG:
        acc_g += tl.load(BG + n0 + rn, mask=rn < n_left, other=0.0).to(tl.float32)[None, :]
    if HAS_BU:
        acc_u += tl.load(BU + n0 + rn, mask=rn < n_left, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        tl.store(_tile_ptrs(G, m0, n0, N, 1, BLOCK_M, BLOCK_N), acc_g.to(G.dtype.element_ty), mask=ok)
        tl.store(_tile_ptrs(U, m0, n0, N, 1, BLOCK_M, BLOCK_N), acc_u.to(U.dtype.element_ty), mask=ok)
    h = _act(acc_g, ACT) * acc_u
    tl.store(_tile_ptrs(H, m0, n0, N, 1, BLOCK_M, BLOCK_N), h.to(H.dtype.element_ty), mask=ok)


@triton.jit
def _gated_kernel(
    X, WG, WU, BG, BU, H, G, U,  # X (M, K), WG / WU (N, K) strided; BG / BU (N,); H, G, U (M, N) contiguous
    M, N, K,
    stride_xm, stride_xk, stride_gn, stride_gk, stride_un, stride_uk,
    M_BUCKET,  # autotune key only
    ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of h = act(x @ wg.T + bg) * (x @ wu.T + bu): per K step one x tile and the two
    weight tiles (read as (BLOCK_K, BLOCK_N) through their strides), two fp32 accumulators; g and u are stored only
    when SAVE_PRE, h always, each rounded once from fp32."""
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    offs_k = tl.arange(0, BLOCK_K)
    offs_k64 = offs_k.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k64[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    g_ptrs = WG + offs_k64[:, None] * stride_gk + offs_n[None, :] * stride_gn  # (BLOCK_K, BLOCK_N) of wg.T
    u_ptrs = WU + offs_k64[:, None] * stride_uk + offs_n[None, :] * stride_un  # (BLOCK_K, BLOCK_N) of wu.T
    x_step = as_int64(stride_xk) * BLOCK_K
    g_step = as_int64(stride_gk) * BLOCK_K
    u_step = as_int64(stride_uk) * BLOCK_K

    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w_ok = k_ok[:, None] & n_ok[None, :]
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g = dot_acc(x, tl.load(g_ptrs, mask=w_ok, other=0.0), acc_g, DOT_PRECISION, DOT_UPCAST)
        acc_u = dot_acc(x, tl.load(u_ptrs, mask=w_ok, other=0.0), acc_u, DOT_PRECISION, DOT_UPCAST)
        x_ptrs += x_step
        g_ptrs += g_step
        u_ptrs += u_step

    # epilogue, on EPI_SPLIT column slices of the tiles one after another (fewer values live at once)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    m_left = M - pid_m * BLOCK_M
    n_left = N - pid_n * BLOCK_N
    SUB_N: tl.constexpr = BLOCK_N // EPI_SPLIT
    for j in tl.static_range(EPI_SPLIT):
        _gated_epilogue(
            _slice(acc_g, j, EPI_SPLIT, BLOCK_M, BLOCK_N), _slice(acc_u, j, EPI_SPLIT, BLOCK_M, BLOCK_N),
            n0 + j * SUB_N, n_left - j * SUB_N, H, G, U, BG, BU, m0, m_left, N, ACT, HAS_BG, HAS_BU, SAVE_PRE,
            BLOCK_M, SUB_N,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Launchers.

# Autotune lists, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, EPI_SPLIT), GROUP_M = 8, per architecture,
# dot kind and kernel. Chosen from offline compiles (triton.compile for sm_80 / sm_90 with Triton's ptxas, registers
# and spills read with cuobjdump) with the heaviest epilogues (linear with bias + act + residual + pre, dact and
# dgated, for gelu / gelu_tanh / silu; the gated kernel with both biases and g, u): the configs listed compile
# without spilling there, except the 128 x 256 tiles with the dact / dgated epilogues of gelu_tanh and silu
# (16-400 bytes per thread, once per tile after the K loop; kept for the forward and plain GEMMs) and sm_90's
# 128 x 128 / 4-warp tile with dgated (8-72 bytes). Not yet timed on a GPU. Configs that do not fit a GPU's shared
# memory are skipped by the autotuner.
#   EPI_SPLIT: the epilogue runs on 1, 2 or 4 column slices of the tile (_halves); unsplit, a 128 x 128 tile with
#   the dgated epilogue spilled about 650 bytes per thread on sm_90 at 8 warps, 2.4 KiB at 4 warps.
#   16-bit, sm_90 (wgmma: a warpgroup of 4 warps owns 64 rows of the accumulator; pointer loads pipelined with
#   cp.async): BLOCK_K = 64 (128 bytes of a K-contiguous row), 3-4 stages of A and B tiles in shared memory (a
#   128 x 256 x 64 stage is 48 KiB). The 32-row config is for decode-sized M (a few tokens), where bigger row tiles
#   are mostly padding and the GEMM streams the weight.
#   16-bit, sm_80 (mma.sync; 164 KiB of shared memory per block): BLOCK_K = 32 with 3-4 stages, as in the Triton
#   tutorial's Ampere list, plus one BLOCK_K = 64 config.
#   Gated: two weight tiles per stage and two accumulators, so about half the tile area.
#   fp32 (IEEE FMA dot, the same on both architectures: no tensor cores): operands and the accumulator live in
#   registers, so smaller tiles and 2-3 stages.
_MMA_CONFIGS = {
    90: {
        "_gemm_kernel": [(128, 256, 64, 8, 3, 4), (128, 128, 64, 8, 3, 2), (128, 128, 64, 4, 4, 4),
                         (64, 128, 64, 4, 4, 2), (128, 64, 64, 8, 3, 2), (32, 64, 128, 4, 4, 1)],
        "_gated_kernel": [(128, 128, 64, 8, 3, 4), (128, 64, 64, 4, 4, 2), (64, 128, 64, 4, 4, 4),
                          (64, 64, 64, 4, 4, 1), (32, 64, 128, 4, 4, 1)],
    },
    80: {
        "_gemm_kernel": [(128, 256, 32, 8, 3, 4), (128, 128, 32, 8, 3, 4), (128, 128, 64, 8, 3, 4),
                         (64, 128, 32, 4, 4, 4), (128, 64, 32, 8, 3, 2), (32, 64, 64, 4, 4, 1)],
        "_gated_kernel": [(128, 64, 32, 8, 3, 2), (64, 128, 32, 8, 3, 2), (128, 64, 32, 4, 4, 2),
                          (64, 128, 32, 4, 4, 4), (64, 64, 32, 4, 4, 1), (32, 64, 64, 4, 4, 1)],
    },
}  # fmt: skip
_FMA_CONFIGS = {
    "_gemm_kernel": [(64, 64, 32, 4, 3, 1), (128, 64, 32, 8, 3, 1), (64, 128, 32, 8, 3, 2), (128, 128, 16, 8, 2, 4),
                     (32, 64, 32, 4, 3, 1)],
    "_gated_kernel": [(64, 64, 32, 8, 2, 1), (64, 64, 16, 4, 3, 2), (32, 64, 32, 4, 3, 1), (64, 32, 32, 4, 3, 1)],
}  # fmt: skip
# Autotune key (the autotuner adds the dtypes of the tensor arguments itself); M enters as a coarse bucket.
_TUNE_KEYS = {
    "_gemm_kernel": ["M_BUCKET", "N", "K", "EPILOGUE", "ACT", "HAS_BIAS", "HAS_AUX", "SAVE_PRE"],
    "_gated_kernel": ["M_BUCKET", "N", "K", "ACT", "HAS_BG", "HAS_BU", "SAVE_PRE"],
}


def _config_list(name: str, arch: int, fp32: bool) -> list:
    return _FMA_CONFIGS[name] if fp32 else _MMA_CONFIGS[arch][name]


@functools.cache
def _tuned(name: str, arch: int, fp32: bool):
    """The autotuned wrapper of kernel `name` for one config list."""
    configs = [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": GROUP_M, "EPI_SPLIT": split},
            num_warps=w,
            num_stages=s,
        )
        for m, n, k, w, s, split in _config_list(name, arch, fp32)
    ]
    return triton.autotune(configs=configs, key=_TUNE_KEYS[name])(globals()[name])


def _check_block(block) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, EPI_SPLIT) of the test hook block = (BLOCK_M, BLOCK_N, BLOCK_K[, EPI_SPLIT])."""
    tiles, split = tuple(block[:3]), (block[3] if len(block) == 4 else 1)
    if len(block) not in (3, 4) or any(b < 16 or b & (b - 1) for b in tiles):
        raise ValueError(f"gemm: block must be 3 powers of two >= 16 (tl.dot's minimum) and a split, got {block}")
    if split not in (1, 2, 4) or tiles[1] // split < 1:
        raise ValueError(f"gemm: the epilogue split must be 1, 2 or 4, got {block}")
    return (*tiles, split)


def _launch(name: str, M: int, N: int, args: tuple, consts: dict, t: torch.Tensor, block) -> None:
    """Launch kernel `name` over the (M, N) output tiles: autotuned on CUDA unless block is forced; CPU_CONFIG
    (or block) elsewhere. args end with M_BUCKET; consts: the constexprs other than the tile sizes."""
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with device_ctx(t):
        if t.is_cuda and block is None:
            _tuned(name, gpu_arch(t.device), t.dtype == torch.float32)[grid](*args, **consts)
            return
        bm, bn, bk, split = _check_block(block) if block is not None else (*CPU_CONFIG[:3], 1)
        group = GROUP_M if t.is_cuda else CPU_CONFIG[3]
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EPI_SPLIT=split)
        globals()[name][grid(tile)](*args, **consts, **tile, num_warps=4, num_stages=3 if t.is_cuda else 1)


def _strides(t: torch.Tensor | None) -> tuple[int, int]:
    return tuple(t.stride()) if t is not None else (0, 0)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           activation: str = "none", save_pre: bool = False, *, block: tuple[int, ...] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(y, pre) with pre = x @ w.T + bias (fp32 accumulation) and y = act(pre) + residual.

    x (M, K), w (N, K) (nn.Linear layout), any strides; bias (N,) or None; residual (M, N), any strides, or None;
    all of x's dtype (float32 / bfloat16 / float16) on one device; activation in ACTIVATIONS. y is a new contiguous
    (M, N) tensor of x's dtype, rounded once from fp32. pre (contiguous, x's dtype) is returned only when save_pre
    and activation != "none" (the backward's act'(pre)), else None. block: test hook forcing (BLOCK_M, BLOCK_N,
    BLOCK_K[, EPI_SPLIT]), powers of two >= 16 and a split of 1, 2 or 4 (no autotuning).
    """
    M, K = x.shape
    N = w.shape[0]
    keep_pre = save_pre and activation != "none"
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty((M, N), dtype=x.dtype, device=x.device) if keep_pre else None
    if M == 0 or N == 0:
        return y, pre
    args = (
        x, w, y, pre, bias, residual, None, M, N, K,
        *x.stride(), w.stride(1), w.stride(0), *_strides(residual), 0, 0, m_bucket(M),
    )  # fmt: skip
    consts = dict(
        EPILOGUE="linear", ACT=activation, HAS_BIAS=bias is not None, HAS_AUX=residual is not None,
        SAVE_PRE=keep_pre, **dot_args(x),
    )  # fmt: skip
    _launch("_gemm_kernel", M, N, args, consts, x, block)
    return y, pre


def gated(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, bg: torch.Tensor | None = None,
          bu: torch.Tensor | None = None, activation: str = "silu", save_pre: bool = False, *,
          block: tuple[int, ...] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(h, g, u) with g = x @ wg.T + bg, u = x @ wu.T + bu, h = act(g) * u, in one kernel (_gated_kernel).

    x (M, K), wg / wu (N, K), any strides; bg / bu (N,) or None; one dtype and device; activation in
    GATED_ACTIVATIONS. h is a new contiguous (M, N) tensor of x's dtype, computed from the fp32 g and u and rounded
    once. g and u (contiguous, x's dtype) are returned only when save_pre, else None. block: test hook as in linear.
    """
    M, K = x.shape
    N = wg.shape[0]
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    g = torch.empty((M, N), dtype=x.dtype, device=x.device) if save_pre else None
    u = torch.empty((M, N), dtype=x.dtype, device=x.device) if save_pre else None
    if M == 0 or N == 0:
        return h, g, u
    args = (x, wg, wu, bg, bu, h, g, u, M, N, K, *x.stride(), *wg.stride(), *wu.stride(), m_bucket(M))
    consts = dict(ACT=activation, HAS_BG=bg is not None, HAS_BU=bu is not None, SAVE_PRE=save_pre, **dot_args(x))
    _launch("_gated_kernel", M, N, args, consts, x, block)
    return h, g, u


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    mode: str = "none",
    activation: str = "none",
    aux: torch.Tensor | None = None,
    aux2: torch.Tensor | None = None,
    *,
    block: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(c, c2) from acc = a @ b (fp32 accumulation); a (M, K), b (K, N), any strides (e.g. dy.T, w).

    mode "none":   c = acc in a's dtype, c2 None.
    mode "dact":   c = acc * act'(aux), aux (M, N) of a's dtype (the forward's pre-activation); c2 None.
    mode "dgated": aux = g, aux2 = u (M, N): c = acc * u * act'(g) (grad of g), c2 = acc * act(g) (grad of u).
    New outputs are contiguous (M, N) of a's dtype, rounded once from fp32. block: test hook as in linear.
    """
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device)
    c2 = torch.empty((M, N), dtype=a.dtype, device=a.device) if mode == "dgated" else None
    if M == 0 or N == 0:
        return c, c2
    if mode == "none":
        epilogue, act, x1, x2 = "linear", "none", None, None
    else:
        epilogue, act, x1, x2 = mode, activation, aux, aux2
    args = (
        a, b, c, c2, None, x1, x2, M, N, K, *a.stride(), *b.stride(), *_strides(x1), *_strides(x2), m_bucket(M),
    )  # fmt: skip
    consts = dict(
        EPILOGUE=epilogue, ACT=act, HAS_BIAS=False, HAS_AUX=x1 is not None, SAVE_PRE=False, **dot_args(a),
    )  # fmt: skip
    _launch("_gemm_kernel", M, N, args, consts, a, block)
    return c, c2
