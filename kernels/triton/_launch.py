"""Launcher helpers shared by the Triton kernel modules (attention, gemm, int8, layer_norm): one definition each.

Host side: the device context of a launch, the dot-precision constexprs, the SM count, the autotune bucket of M and
the architecture family. Device side (@triton.jit), for the GEMM kernels of gemm.py and int8.py: the grouped tile
order, the int64 scalar cast, one tl.dot step (fp32 / 16-bit / int8 / int8-weight tiles) and the K loop of a tile.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Coarse buckets of M for autotune keys: the token count varies from call to call, a re-tune per value would not pay.
M_BUCKETS = (16, 64, 256, 1024, 4096, 16384)


def device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def dot_args(t: torch.Tensor) -> dict:
    """The dot constexprs for tiles of t's dtype. DOT_PRECISION: fp32 tiles take IEEE fp32 products (no TF32
    rounding of the operands); 16-bit tiles ignore it. DOT_UPCAST: bfloat16 under the interpreter, whose tl.dot
    multiplies bfloat16 tiles as raw 16-bit integers: the kernels widen such tiles to fp32 before the dot (exact)."""
    return dict(
        DOT_PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
        DOT_UPCAST=t.device.type != "cuda" and t.dtype == torch.bfloat16,
    )


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The number of SMs of a CUDA device (the current one when device has no index)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


def m_bucket(m: int) -> int:
    """The autotune bucket of M: the first of M_BUCKETS that holds m (twice the last one above it)."""
    return next((cap for cap in M_BUCKETS if m <= cap), 2 * M_BUCKETS[-1])


def gpu_arch(device: torch.device) -> int:
    """The autotune-list family of a CUDA device: 90 for Hopper and newer, else 80 (Ampere and Ada)."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid in grouped order: groups of GROUP_M tile rows (the last one may be shorter),
    walked column by column inside a group (Triton matmul tutorial, "L2 cache optimizations")."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % group_rows, in_group // group_rows


@triton.jit
def as_int64(x):
    """x as an int64 scalar (x may be a run-time int32 or an int the JIT specialized to a constant, e.g. stride 1)."""
    return tl.zeros([], dtype=tl.int64) + x


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b. int8 a and b: exact int32 products into an int32 acc (int8 x int8 -> int32 MMA). Otherwise fp32
    accumulation, b widened to a's dtype first (an int8 weight tile of W8A16: exact, |v| <= 128 is a bfloat16 /
    float16 / float32), products as DOT_PRECISION says; DOT_UPCAST (see dot_args): both tiles widened to fp32."""
    if DOT_UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.int8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def mm_tile(
    A, B, m0, n0, M, N, K,  # m0, n0: the tile's corner (int64)
    stride_am, stride_ak, stride_bk, stride_bn,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_M, BLOCK_N) tile at (m0, n0) of A @ B for A (M, K) and B (K, N) strided, accumulated in ACC_DTYPE
    (int32 for int8 tiles, else fp32) in BLOCK_K steps (dot_acc). Rows >= M, columns >= N and the K tail load 0.
    Offsets are int64 before they meet a stride (M * stride overflows int32 on large operands; a transposed view has
    stride M along K), and so is the per-step increment BLOCK_K * stride_k."""
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    k64 = offs_k.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None] * stride_am + k64[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + k64[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    a_step = as_int64(stride_ak) * BLOCK_K
    b_step = as_int64(stride_bk) * BLOCK_K
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0  # (BLOCK_K,)
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = dot_acc(a, b, acc, DOT_PRECISION, DOT_UPCAST)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc
