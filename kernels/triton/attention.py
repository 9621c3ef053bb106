"""Flash attention in Triton: forward, split-K decode, backward (GQA/MQA, causal, masks, ragged KV lengths).

Semantics are those of fastllm.ops.attention (its module docstring): for query row i of batch b, head h,

    visible(j) = j < Sk_b  and  (not causal or j <= i + offset_b)  and  mask[b, h, i, j]   (bool masks)
    s_j   = scale * q_i . k_j  (+ mask[b, h, i, j] for additive float masks)
    out_i = sum_j softmax(s)_j v_j over the visible j;   lse_i = log sum_j exp(s_j) over the visible j
    Sk_b = clamp(kv_len[b], 0, Sk) (Sk without kv_len);  offset_b = Sk_b - Sq (bottom-right) or 0 (top-left)

and a row with no visible key gets out = 0 and lse = +inf, so that the backward's exp(s - lse) is 0 there.

Glossary
    B, Hq, Hkv  batch, query heads, key/value heads; G = Hq // Hkv query heads share one kv head (GQA/MQA):
                query head h reads kv head h // G. k and v are never expanded in memory.
    Sq, Sk      query and key lengths; Sk_b the visible key length of batch b (see above)
    D           head dim, any value 1..256, a constexpr; BLOCK_D = max(16, next_pow2(D)) is the tile width, the
                lanes d >= D load 0 (they add 0 to every dot product) and are never stored. D is a compile-time
                constant because the mask d < D must be too: with a run-time D the compiler cannot prove the mask
                uniform over 16-byte chunks, loads go one element at a time, and with 2-byte elements the
                pipeliner then cannot use cp.async, so K/V would not be prefetched at all (checked in the TTGIR).
    BLOCK_M     query rows per tile; BLOCK_N keys per tile (powers of two >= 16, the minimum of tl.dot)
    s2          scores in base 2: s2 = fl(q . k) * qk_scale (+ mask * log2(e)), qk_scale = scale * log2(e),
                so that every exponential is one exp2 (one MUFU.EX2, no multiply; the Triton tutorial's
                folding). The forward and the backward compute s2 with the same operations.
    m, l        per row: m = max_j s2_j (running max in the forward), l = sum_j exp2(s2_j - m); so
                P_j = exp2(s2_j - m) / l and lse = (m + log2 l) * ln 2
    stats       (B, Hq, Sq, 2) fp32 (m, l), what attn_fwd(stats=True) saves for the backward (the contract of
                fastllm::attention_fwd when it saves stats): rows with no visible key get (+inf, 1)
    delta       rowsum(dO * O) (FlashAttention-2's D_i), computed by a small preprocess kernel
    "full" / "masked" key blocks: a block is full for a query tile when every key in it is visible to every
                row of the tile as far as causality and Sk_b go (the user's mask aside); only masked blocks
                pay for the element-wise visibility test. Blocks past the last visible key are not visited.

Why (m, l) rather than lse for the backward. The backward recomputes P = exp2(s2 - m) / l. m is one of the s2
values computed the same way, so for the probabilities that matter s2 - m is small (0 exactly for the row's
maximum) and P is as accurate as eager's max-subtracted softmax. From lse, P = exp(s - lse) where lse (|lse| grows
with the row's peak score and log Sk) carries an fp32 rounding of about 1e-6 relative that lands on every P of
the row. Measured here in fp32, as the ratio of the error to the criterion's bound (pass <= 1): with (m, l) at
most 0.5 on peaked rows (scale = 1, D = 64) and 0.75 on ordinary ones; from lse up to 1.0 and 0.9 (1.2 on dQ when
the backward formed s2 - lse * log2(e) instead of s - lse). attn_fwd still returns lse by default (and attn_bwd
takes either), as FlashAttention does; fastllm::attention_fwd saves the stats.

Kernels (grids put batch on axis 2 and heads on axis 1, so no axis exceeds CUDA's 65535 limit on y/z): the forward
and decode ones in attention_fwd.py, the backward ones in attention_bwd.py; this file holds the launchers.
    _attn_fwd_kernel        FlashAttention-2 forward (Dao 2023, "FlashAttention-2: Faster Attention with Better
                            Parallelism and Work Partitioning", Alg. 1): program (query block, head, batch) holds
                            Q in registers and streams K/V blocks with the online softmax, fp32 accumulator,
                            rescaled only by alpha = exp2(m_old - m_new); one division by l at the end.
    _attn_decode_kernel     Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for long-context
    _attn_combine_kernel    inference"): for few query rows, split the keys into NUM_SPLITS chunks per sequence;
                            program (split, kv head x row block, batch) packs the G * Sq rows of a GQA group into
                            one tile (row r = (head in group r // Sq, query r % Sq)), so K/V are read once per kv
                            head, not once per query head; it writes its unnormalized output and (m, l) to
                            fp32 scratch; the combine kernel rescales the splits to the row max and merges them.
    _attn_bwd_preprocess_kernel   delta = rowsum(dO * O)
    _attn_bwd_dkdv_kernel   program (key block, kv head, batch): K, V tiles stay in registers; it loops over the
                            G query heads of the group and their query blocks (dK, dV summed over the group in
                            registers: deterministic, no atomics), recomputing P = exp2(Q K^T qk_scale - m) / l
                            exactly as the forward computed it (FlashAttention-2, Alg. 2; see _bwd_dkdv_inner for
                            why not the Triton tutorial's transposed K Q^T).
    _attn_bwd_dq_kernel     program (query block, head, batch): dQ = scale * sum_j dS_j K_j over the key blocks.
    Backward formulas: dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q.
    The mask gets no gradient; kv_len has no backward (decode is inference only).

Causal block skipping. Query tile [m0, m0 + BLOCK_M) (rows < Sq) sees keys j < min(Sk_b, min(m0 + BLOCK_M, Sq) +
offset): the forward and dQ loops stop there, so a skipped key block is exactly one that no row of the tile can
see. Keys j < min(Sk_b, m0 + offset + 1) are visible to every row of the tile; the blocks wholly below that bound
(rounded down to BLOCK_N) are "full", the rest up to the stop are "masked". The dK/dV program of key block
[n0, n0 + BLOCK_N) starts at the query block of row max(0, n0 - offset) (earlier rows see none of its keys) and
treats query blocks from row n0 + BLOCK_N - 1 - offset on (rounded up to BLOCK_M) as full, but for a last partial
query block, which takes the masked pass so that its padded rows get P = 0 (see _bwd_dkdv_inner).

Same scores forward and backward. The backward's P = exp2(s2 - m) / l is only as good as its s2 matches the
forward's, bit for bit, for the keys that carry the probability: with peaked rows (scale = 1, D = 64: |s2| ~ 30)
one ulp of s2 is a 2e-6 relative error on P, enough to put fp32 dV past the 2x-eager bound (measured here: 1.6-2.8x
with a transposed or reordered recomputation, 0.3-0.5x when identical). So (1) every kernel computes
s2 = fl(q . k) * qk_scale with q as the left operand (Q K^T: dK/dV does not use the Triton tutorial's K Q^T,
whose sums run in another order), and (2) the kernels are compiled with enable_fp_fusion=False: with fusion,
ptxas may contract s2 - m into fma(q . k, qk_scale, -m) in one kernel and not in the other (the forward's masked
blocks put a select between the multiply and the subtraction), which differs by up to half an ulp of s2.

Precision. Q K^T and P V run on tl.dot with fp32 accumulation: 16-bit inputs use tensor cores and P (and dS in
the backward) is rounded to the input dtype before its dot, as in FlashAttention-2; fp32 inputs use
input_precision="ieee" (no TF32), so fp32 stays fp32. The softmax statistics, the accumulators and lse are fp32.
Rows whose running max is still -inf (nothing visible yet) subtract 0 instead of -inf, so no -inf - -inf = NaN
appears; they keep l = 0 and are written as out = 0, lse = +inf (stats (+inf, 1)).

NaN and Inf (as torch's eager softmax). A NaN or +inf among a row's visible scores (from q, k or an additive mask)
makes that p NaN (exp2(NaN), or exp2(inf - inf) at the row max), so l and acc turn NaN and stay NaN through every
rescale (NaN * alpha); the epilogue tells empty rows by l == 0 (not l > 0, false for NaN) and the row comes out NaN,
with NaN stats, which make the backward's P NaN for that row. A -inf score is an invisible key. Inf in v gives
+-inf outputs through P V. No test is added to the key loops: the NaN rides along in l. Keys a row cannot see
(causal, a bool mask, past kv_len) have their score replaced by -inf, so a NaN there does not reach the row; but a
NaN / Inf *value* of such a key inside a tile the row visits does, through 0 * NaN in P V (torch's eager SDPA
gives NaN in every row there: its softmax adds the -inf mask to the NaN score and multiplies the zero
probabilities by v).

Offsets. Batch, head and sequence offsets are int64 (b * stride_b overflows int32 on large KV caches; a
(B, S, H, D) layout viewed as (B, H, S, D) has stride_s = H * D, so S * stride_s can too). Within a tile the
head-dim offsets stay int32.

Block sizes. On CUDA the forward and backward kernels are autotuned (triton.autotune) over a short list, keyed
on coarse Sq / Sk buckets, BLOCK_D, causal, mask presence and the dtypes; the lists shrink the tiles as BLOCK_D
grows and for fp32 (whose IEEE dot runs on FMA units with everything in registers), see _MMA_CONFIGS. Under
the interpreter (CPU tensors, TRITON_INTERPRET=1) one fixed small config is used (autotuning there would run
every config through the slow interpreter). Tests may force block sizes with the keyword arguments block_m /
block_n (and decode / num_splits) to get several blocks on tiny shapes.

Decode dispatch. attn_fwd takes the split-K decode kernels when Sq <= DECODE_MAX_SQ (whatever kv_len and the
mask are): with few query rows a FlashAttention-2 tile of 64-128 rows is mostly empty, and one program per
query head re-reads the same K/V G times and leaves the GPU idle for small B * Hq. Both paths compute the same
function; `decode=` forces one. Keys past Sk_b are never loaded (their loads are masked to 0), so a KV cache may
hold anything (NaN) there. The combine kernel's (m, l) are the row's true max and sum, as the FlashAttention-2
kernel saves them, so a backward may follow a decode forward; they match the backward's recomputed scores bit for
bit where a dot's rounding does not depend on the row's position in the tile (tensor-core MMA, the FMA dot), which
the interpreter's numpy matmul does not guarantee (the decode tiles pack a GQA group's rows).

Interpreter notes (TRITON_INTERPRET=1). Loop variables of `range` over tensor bounds are Python ints there, so
they are only ever combined with tensors (start + tl.arange(...)), never converted with .to(). fp32 -> bfloat16
casts round toward zero in triton 3.6's interpreter (compiled code rounds to nearest even; tests/conftest.py
patches the interpreter to do the same), so bfloat16 results would differ from a GPU run in the last bit. The
interpreter's tl.dot multiplies bfloat16 tiles as raw 16-bit integers, so there (only) the tiles are widened to
fp32 before each dot (constexpr DOT_UPCAST; the rounding of P and dS to bfloat16 is kept, so the numerics are those
of the compiled kernel up to the summation order). Absent tensors (mask, kv_len) are passed as None with a
constexpr HAS_* flag. tl.load of a torch.bool pointer loads bytes and returns int1 (True = attend).
"""

import functools

import torch
import triton
from fastllm.kernels.triton._launch import device_ctx, dot_args, sm_count
from fastllm.kernels.triton.attention_bwd import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
)
from fastllm.kernels.triton.attention_fwd import LOG2E, _attn_combine_kernel, _attn_decode_kernel, _attn_fwd_kernel

# Query lengths up to this take the split-K decode kernels (see the module docstring).
DECODE_MAX_SQ = 16
# Interpreter (CPU tensors): one small fixed config; splits > 1 so the combine kernel is exercised.
CPU_BLOCK_M = 16
CPU_BLOCK_N = 16
CPU_NUM_SPLITS = 3
# Flash-decoding on CUDA: at most this many key chunks per sequence, each at least MIN_SPLIT_BLOCKS key blocks
# long (a split writes BLOCK_M * (D + 2) fp32 partials; below a few key blocks that write and the combine cost more
# than the parallelism gains).
MAX_SPLITS = 64
MIN_SPLIT_BLOCKS = 4
# Compile the forward and backward kernels without mul+add -> fma contraction (Triton's enable_fp_fusion, on by
# default): the backward must rebuild the forward's s2 - m to the bit (module docstring).
FP_FUSION = False


# --------------------------------------------------------------------------------------------------
# Launchers. The caller (fastllm.ops.attention) has validated shapes, dtypes and devices and made stride(-1) == 1
# for q, k, v, out and dout; the mask is already expanded to (B, Hq, Sq, Sk) (a view, stride 0 where broadcast).

# Autotune lists, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, dot kind and BLOCK_D. Chosen from offline
# compiles for sm_80 and sm_90 (triton.compile with the JIT's alignment hints, registers and spills read with
# cuobjdump): configs that spilled heavily were dropped; those left spill little or nothing. Configs that do not
# fit a GPU's shared memory are skipped by the autotuner (it catches OutOfResources).
#   16-bit (tensor-core MMA): FlashAttention-2 gives each warp 16 query rows, so 128-row forward tiles take 8
#   warps; 2-4 stages prefetch K/V (cp.async / TMA) ahead of the dots. The dK/dV program holds K, V, dK, dV
#   (BLOCK_N x BLOCK_D, the last two fp32) for its whole life, so its BLOCK_N shrinks as D grows, with small query
#   blocks (the Triton tutorial uses 32 x 128 at D = 64); the dQ program is the mirror image.
#   fp32 (IEEE FMA dot: no tensor cores): both operands and the product tile live in registers, so the tiles are
#   much smaller.
# The kernels _launch starts by name (attention_fwd.py, attention_bwd.py).
_KERNELS = {
    "_attn_fwd_kernel": _attn_fwd_kernel,
    "_attn_bwd_dkdv_kernel": _attn_bwd_dkdv_kernel,
    "_attn_bwd_dq_kernel": _attn_bwd_dq_kernel,
}
_MMA_CONFIGS = {
    "_attn_fwd_kernel": {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
             (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 2)],
        # D = 128: without (128, 128, 8, 3) and (64, 128, 4, 3), which need 176 KiB of shared memory in bf16 (over
        # sm_80's 163 KiB; the first also over sm_90's 227: tests/test_triton_compile.py measured them)
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 2)],
        256: [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    },
    "_attn_bwd_dkdv_kernel": {
        64: [(32, 64, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 2), (64, 128, 8, 2)],
        128: [(16, 128, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2), (32, 128, 8, 2)],
        256: [(16, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
    },
    "_attn_bwd_dq_kernel": {
        128: [(128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
        256: [(32, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 2)],
    },
}  # fmt: skip
_FMA_CONFIGS = {
    "_attn_fwd_kernel": {
        64: [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        128: [(32, 32, 8, 2), (64, 32, 8, 2), (32, 16, 4, 2)],
        256: [(16, 16, 4, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
    },
    "_attn_bwd_dkdv_kernel": {
        64: [(32, 32, 8, 2), (16, 32, 4, 2), (16, 64, 8, 2)],
        128: [(16, 32, 8, 2), (16, 16, 8, 2)],
        256: [(16, 16, 8, 2), (16, 16, 4, 2)],
    },
    "_attn_bwd_dq_kernel": {
        64: [(32, 32, 4, 2), (64, 32, 8, 2), (64, 16, 4, 2)],
        128: [(16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2)],
        256: [(16, 16, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    },
}  # fmt: skip
# Autotune key: argument names (the autotuner adds the dtypes of all tensor arguments itself). Sequence lengths
# enter as coarse buckets so that serving many lengths does not re-tune for each one.
_TUNE_KEY = ["SQ_BUCKET", "SK_BUCKET", "BLOCK_D", "CAUSAL", "HAS_MASK", "MASK_BOOL", "HAS_KV_LEN", "STATS"]
_SEQ_BUCKETS = (128, 512, 2048, 8192, 32768)
# Decode on CUDA: up to 64 packed rows per tile (see _decode for the key block), no autotuning (the kernel is
# bound by reading K/V once; the split count, not the tile, sets the parallelism).
DECODE_MAX_BLOCK_M = 64


def _seq_bucket(n: int) -> int:
    return next((cap for cap in _SEQ_BUCKETS if n <= cap), 2 * _SEQ_BUCKETS[-1])


def _config_list(name: str, fp32: bool, block_d: int) -> list:
    """The autotune list of kernel `name`: the first table entry whose BLOCK_D bound covers block_d."""
    table = (_FMA_CONFIGS if fp32 else _MMA_CONFIGS)[name]
    return table[min(bound for bound in table if bound >= block_d)]


@functools.cache
def _tuned(name: str, fp32: bool, block_d: int):
    """The autotuned wrapper of kernel `name` for one config list (one Autotuner, with its own cache, each)."""
    table = _config_list(name, fp32, block_d)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]
    return triton.autotune(configs=configs, key=_TUNE_KEY)(_KERNELS[name])


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (value < 16 or value & (value - 1)):
        raise ValueError(f"flash_attention: {name} must be a power of two >= 16 (tl.dot's minimum), got {value}")


def _launch(name: str, grid, args: tuple, consts: dict, device: torch.device, block_m, block_n) -> None:
    """Launch kernel `name`: autotuned on CUDA unless block sizes are forced; one fixed config elsewhere.

    grid(BLOCK_M, BLOCK_N) -> the launch grid. consts: the constexpr arguments other than BLOCK_M / BLOCK_N.
    FP_FUSION is off (see the module docstring, "Same scores forward and backward").
    """
    if device.type == "cuda" and block_m is None and block_n is None:
        tuned = _tuned(name, args[0].dtype == torch.float32, consts["BLOCK_D"])
        tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts, enable_fp_fusion=FP_FUSION)
        return
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    on_gpu = device.type == "cuda"
    bm = block_m or (64 if on_gpu else CPU_BLOCK_M)
    bn = block_n or (64 if on_gpu else CPU_BLOCK_N)
    _KERNELS[name][grid(bm, bn)](
        *args, **consts, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=4, num_stages=2 if on_gpu else 1, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def _mask_args(mask: torch.Tensor | None) -> tuple:
    """(MASK, its 4 strides, MASK_BOOL) for a mask viewed as (B, Hq, Sq, Sk) or None."""
    if mask is None:
        return None, (0, 0, 0, 0), False
    return mask, tuple(mask.stride()), mask.dtype == torch.bool


def attn_fwd(
    q, k, v, mask, kv_len, causal: bool, bottom_right: bool, scale: float,
    *, stats: bool = False, block_m: int | None = None, block_n: int | None = None, decode: bool | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse) of attention (semantics in the module docstring); (out, stats) with stats=True.

    q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) of one dtype (float32 / bfloat16 / float16), Hq % Hkv == 0, any strides
    with stride(-1) == 1, 1 <= D <= 256, Sq, Sk >= 1. mask: None or a (B, Hq, Sq, Sk) view, bool (True = attend) or
    q's dtype (additive). kv_len: None or int32 (B,) (keys >= kv_len[b] invisible; clamped to [0, Sk]).
    Returns out (B, Hq, Sq, D) contiguous in q's dtype and lse (B, Hq, Sq) fp32 contiguous (natural log; +inf and
    out = 0 for rows that see no key); with stats=True, instead of lse, stats (B, Hq, Sq, 2) fp32 contiguous = (m, l)
    per row (base-2 row max and sum, see the glossary; (+inf, 1) for rows that see no key), which attn_bwd turns
    into more accurate gradients than lse (module docstring).
    Test hooks: block_m / block_n force the tile sizes (powers of two >= 16; no autotuning), decode forces the
    split-K decode path (True) or the FlashAttention-2 kernel (False) instead of the Sq <= DECODE_MAX_SQ rule, and
    num_splits the decode's number of key chunks.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq, 2) if stats else (B, Hq, Sq), dtype=torch.float32, device=q.device)
    mask_t, mask_strides, mask_bool = _mask_args(mask)
    block_d = max(16, triton.next_power_of_2(D))
    use_decode = Sq <= DECODE_MAX_SQ if decode is None else decode
    common = (
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides,
        Hq, Hq // Hkv, Sq, Sk, D, scale * LOG2E,
    )  # fmt: skip
    consts = dict(
        CAUSAL=causal, BOTTOM_RIGHT=bottom_right, HAS_MASK=mask is not None, MASK_BOOL=mask_bool,
        HAS_KV_LEN=kv_len is not None, BLOCK_D=block_d, **dot_args(q),
    )  # fmt: skip
    with device_ctx(q):
        if use_decode:
            _decode(q, k, v, mask_t, kv_len, out, lse, stats, common, consts, block_m, block_n, num_splits)
        else:
            _launch(
                "_attn_fwd_kernel",
                lambda bm, bn: (triton.cdiv(Sq, bm), Hq, B),
                (q, k, v, out, lse, mask_t, kv_len, *common, _seq_bucket(Sq), _seq_bucket(Sk)),
                dict(consts, STATS=stats), q.device, block_m, block_n,
            )  # fmt: skip
    return out, lse


def _decode(q, k, v, mask, kv_len, out, lse, stats, common, consts, block_m, block_n, num_splits) -> None:
    """Flash-decoding: split-K partials into fp32 scratch, then the combine kernel writes out and lse (or stats).

    Rows: the G * Sq (head in group, query) pairs of a kv head, in tiles of BLOCK_M. Splits: CPU_NUM_SPLITS under
    the interpreter; on CUDA enough to give about two programs per SM, each split at least MIN_SPLIT_BLOCKS key
    blocks of the cache length (the kernel then divides each sequence's own length evenly among the splits).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    rows = G * Sq
    on_gpu = q.device.type == "cuda"
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    if on_gpu:
        # the forward's tiles, fewer rows: 16-bit up to 64 x 64 (64 x 32 at D = 256); fp32 (FMA dot) 32 x 32
        fp32 = q.dtype == torch.float32
        bm = block_m or max(16, min(32 if fp32 else DECODE_MAX_BLOCK_M, triton.next_power_of_2(rows)))
        bn = block_n or (32 if fp32 or consts["BLOCK_D"] > 128 else 64)
    else:
        bm, bn = block_m or CPU_BLOCK_M, block_n or CPU_BLOCK_N
    row_blocks = triton.cdiv(rows, bm)
    if num_splits is None:
        if on_gpu:
            programs = B * Hkv * row_blocks
            sms = sm_count(q.device)
            num_splits = min(MAX_SPLITS, triton.cdiv(2 * sms, programs), triton.cdiv(Sk, MIN_SPLIT_BLOCKS * bn))
        else:
            num_splits = CPU_NUM_SPLITS
    num_splits = max(1, int(num_splits))
    n_rows = B * Hq * Sq
    o_part = torch.empty((num_splits, n_rows, D), dtype=torch.float32, device=q.device)
    ml_part = torch.empty((num_splits, n_rows, 2), dtype=torch.float32, device=q.device)
    _attn_decode_kernel[(num_splits, Hkv * row_blocks, B)](
        q, k, v, o_part, ml_part, mask, kv_len, *common, n_rows, row_blocks, num_splits,
        **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2 if on_gpu else 1, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    block_s = max(2, triton.next_power_of_2(num_splits))
    # one (BLOCK_S, BLOCK_D) fp32 tile per program: about 16 values per thread
    combine_warps = min(8, max(1, block_s * consts["BLOCK_D"] // 512))
    _attn_combine_kernel[(n_rows,)](
        o_part, ml_part, out, lse, n_rows, D, num_splits,
        STATS=stats, BLOCK_S=block_s, BLOCK_D=consts["BLOCK_D"], num_warps=combine_warps,
    )  # fmt: skip


def attn_bwd(
    dout, q, k, v, out, lse, mask, causal: bool, bottom_right: bool, scale: float,
    *, block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of attn_fwd (no kv_len), contiguous, in the dtypes of q, k, v.

    dout, out: like q (stride(-1) == 1). lse: what attn_fwd returned, lse (B, Hq, Sq) fp32 or, more accurate, stats
    (B, Hq, Sq, 2) fp32 from attn_fwd(stats=True). FlashAttention-2 backward: delta = rowsum(dout * out), then the
    dK/dV kernel (one program per key block and kv head, summing over the group's query heads, deterministic) and
    the dQ kernel; both recompute P = exp2(s2 - m) / l (from lse: exp(s - lse)). block_m / block_n force the tile
    sizes (tests).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    lse = lse.to(torch.float32).contiguous()
    mask_t, mask_strides, mask_bool = _mask_args(mask)
    block_d = max(16, triton.next_power_of_2(D))
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, Sk, D), dtype=v.dtype, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *mask_strides)
    sizes = (Hq, Hq // Hkv, Sq, Sk, D, scale * LOG2E, scale, _seq_bucket(Sq), _seq_bucket(Sk))
    consts = dict(
        CAUSAL=causal, BOTTOM_RIGHT=bottom_right, HAS_MASK=mask is not None, MASK_BOOL=mask_bool,
        STATS=lse.dim() == 4, BLOCK_D=block_d, **dot_args(q),
    )  # fmt: skip
    with device_ctx(q):
        pre_m = 64 if q.is_cuda else CPU_BLOCK_M
        _attn_bwd_preprocess_kernel[(triton.cdiv(Sq, pre_m), Hq, B)](
            out, dout, delta, *out.stride()[:3], *dout.stride()[:3], Hq, Sq, D,
            BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        _launch(
            "_attn_bwd_dkdv_kernel",
            lambda bm, bn: (triton.cdiv(Sk, bn), Hkv, B),
            (q, k, v, dout, lse, delta, dk, dv, mask_t, *strides, *sizes),
            consts, q.device, block_m, block_n,
        )  # fmt: skip
        _launch(
            "_attn_bwd_dq_kernel",
            lambda bm, bn: (triton.cdiv(Sq, bm), Hq, B),
            (q, k, v, dout, lse, delta, dq, mask_t, *strides, *sizes),
            consts, q.device, block_m, block_n,
        )  # fmt: skip
    return dq, dk, dv
