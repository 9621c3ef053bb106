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

Kernels (grids put batch on axis 2 and heads on axis 1, so no axis exceeds CUDA's 65535 limit on y/z)
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
treats query blocks from row n0 + BLOCK_N - 1 - offset on (rounded up to BLOCK_M) as full.

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
casts round toward zero in the interpreter (compiled code rounds to nearest even), so bfloat16 results differ
from a GPU run in the last bit. The interpreter's tl.dot multiplies bfloat16 tiles as raw 16-bit integers, so
there (only) the tiles are widened to fp32 before each dot (constexpr DOT_UPCAST; the rounding of P and dS to
bfloat16 is kept, so the numerics are those of the compiled kernel up to the summation order). Absent tensors
(mask, kv_len) are passed as None with a constexpr HAS_* flag. tl.load of a torch.bool pointer loads bytes and
returns int1 (True = attend).
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

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
# Shared pieces.


@triton.jit
def _causal_bounds(m0, Sq, sk_b, offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, hi) for the query tile starting at row m0: key blocks [0, full_end) are fully visible to every
    row of the tile (full_end is a multiple of BLOCK_N), keys >= hi are visible to none."""
    if CAUSAL:
        last_row = tl.minimum(m0 + BLOCK_M, Sq) - 1
        hi = tl.maximum(tl.minimum(sk_b, last_row + offset + 1), 0)
        all_see = tl.maximum(tl.minimum(sk_b, m0 + offset + 1), 0)
    else:
        hi = sk_b
        all_see = sk_b
    # clamped to >= 0 before the division: // truncates toward zero when compiled
    full_end = (all_see // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_UPCAST (interpreter with bfloat16 only): the interpreter of triton 3.6
    multiplies bfloat16 tiles as their raw 16-bit integer patterns, so they are widened to fp32 first (exactly:
    every bfloat16 is an fp32); compiled kernels never set it and keep the tensor-core dot."""
    if DOT_UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _mask_scores(s2, mvals, MASK_BOOL: tl.constexpr):
    """Apply a user mask tile to base-2 scores: bool -> -inf where False; additive -> + mask * log2(e)."""
    if MASK_BOOL:
        s2 = tl.where(mvals != 0, s2, float("-inf"))
    else:
        s2 = s2 + mvals.to(tl.float32) * _LOG2E
    return s2


@triton.jit
def _store_row_stats(LSE, idx, ok, m, row_sum, STATS: tl.constexpr):
    """Store a row's softmax statistics from its max m (base 2) and sum l = row_sum (0: no visible key).
    STATS: (m, l) at LSE[2 idx], LSE[2 idx + 1], (+inf, 1) for empty rows; else lse = (m + log2 l) ln 2 or +inf."""
    seen = row_sum > 0.0
    l_safe = tl.where(seen, row_sum, 1.0)
    if STATS:
        tl.store(LSE + idx * 2, tl.where(seen, m, float("inf")), mask=ok)
        tl.store(LSE + idx * 2 + 1, l_safe, mask=ok)
    else:
        lse = tl.where(seen, (m + tl.math.log2(l_safe)) * _LN2, float("inf"))
        tl.store(LSE + idx, lse, mask=ok)


@triton.jit
def _load_row_stats(LSE, idx, ok, STATS: tl.constexpr):
    """(m, 1 / l) of the rows idx for the backward (see _bwd_probs); rows not ok get m = +inf (P = 0).
    From lse (not STATS): (lse, 1), the natural-log shift of P = exp(s - lse)."""
    if STATS:
        m = tl.load(LSE + idx * 2, mask=ok, other=float("inf"))
        inv_l = tl.div_rn(1.0, tl.load(LSE + idx * 2 + 1, mask=ok, other=1.0))
    else:
        m = tl.load(LSE + idx, mask=ok, other=float("inf"))
        inv_l = tl.zeros_like(m) + 1.0
    return m, inv_l


@triton.jit
def _bwd_probs(
    qk, mvals, m, inv_l, qk_scale, sm_scale,  # qk (BLOCK_M, BLOCK_N) raw q.k; mvals its mask tile or None
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """The backward's P (BLOCK_M, BLOCK_N). STATS: exp2(s2 - m) / l with s2 formed exactly as in the forward.
    From lse: exp2((s - lse) * log2(e)) with s = qk * scale (+ mask) in natural units (one rounding fewer than
    s2 - lse * log2(e)). m is finite or +inf, never -inf, so no NaN; masked-out entries get exactly 0."""
    if STATS:
        s2 = qk * qk_scale
        if HAS_MASK and not MASK_BOOL:
            s2 = s2 + mvals.to(tl.float32) * _LOG2E
        p = tl.math.exp2(s2 - m[:, None]) * inv_l[:, None]
    else:
        s = qk * sm_scale
        if HAS_MASK and not MASK_BOOL:
            s = s + mvals.to(tl.float32)
        p = tl.math.exp2((s - m[:, None]) * _LOG2E)
    if HAS_MASK and MASK_BOOL:
        p = tl.where(mvals != 0, p, 0.0)
    return p


# --------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,  # state (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,); q (BLOCK_M, BLOCK_D)
    K_head, V_head, M_rows,  # K/V of this (batch, kv head); M_rows: (BLOCK_M, 1) pointers of the mask rows or None
    offs_m, row_ok, offs_d, lo, hi, sk_b, offset, D,  # offs_m: query index of each row; row_ok: row exists
    stride_ks, stride_vs, stride_mj, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) of one query tile. MASKED adds the element-wise test j < Sk_b and the causal test."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D  # (1, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0  # (BLOCK_N,) key indices
        cols64 = cols.to(tl.int64)
        # keys >= Sk_b are never loaded (0 instead): a KV cache may hold NaN past a sequence's length
        kv_ok = cols[:, None] < sk_b  # (BLOCK_N, 1); all true in full blocks
        k = tl.load(K_head + cols64[:, None] * stride_ks + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        s2 = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) base-2 scores
        if HAS_MASK:
            m_ok = row_ok[:, None] & (cols[None, :] < sk_b)
            mvals = tl.load(M_rows + cols64[None, :] * stride_mj, mask=m_ok, other=0)  # (BLOCK_M, BLOCK_N)
            s2 = _mask_scores(s2, mvals, MASK_BOOL)
        if MASKED:
            vis = cols[None, :] < sk_b  # (1, BLOCK_N)
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + offset)  # (BLOCK_M, BLOCK_N)
            s2 = tl.where(vis, s2, float("-inf"))
        v = tl.load(V_head + cols64[:, None] * stride_vs + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        m_new = tl.maximum(m_i, tl.max(s2, 1))  # (BLOCK_M,)
        # rows with nothing visible so far keep m = -inf; subtract 0 there so that exp2 sees -inf, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)  # (BLOCK_M,) rescale of the old state; 0 while m_i = -inf
        p = tl.math.exp2(s2 - m_sub[:, None])  # (BLOCK_M, BLOCK_N), 0 where invisible
        l_i = l_i * alpha + tl.sum(p, 1)  # l sums the unrounded p
        # P rounded to v's dtype for the tensor-core dot (a no-op for fp32)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_D)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, MASK, KV_LEN,  # OUT (B, Hq, Sq, D); LSE: lse (B, Hq, Sq) or stats (B, Hq, Sq, 2); or None
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mi, stride_mj,  # MASK viewed as (B, Hq, Sq, Sk), 0 on broadcast dims
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query block, head h, batch b): out and lse / stats of rows [m0, m0 + BLOCK_M) (FlashAttention-2,
    Alg. 1). Full key blocks [0, full_end) first without the element-wise visibility test, then the masked blocks
    up to the causal / Sk_b stop (see the module docstring); the user mask, when given, is loaded tile by tile.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // G  # GQA: the kv head of this query head
    if HAS_KV_LEN:
        sk_b = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Sk)
    else:
        sk_b = Sk
    if BOTTOM_RIGHT:
        offset = sk_b - Sq
    else:
        offset = 0

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = offs_m < Sq
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h * stride_mh + offs_m.to(tl.int64)[:, None] * stride_mi  # (BLOCK_M, 1)
    else:
        M_rows = MASK

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end, hi = _causal_bounds(m0, Sq, sk_b, offset, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, offs_m, row_ok, offs_d, 0, full_end, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        False, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, offs_m, row_ok, offs_d, full_end, hi, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip

    # epilogue: one IEEE division per element; rows with l = 0 saw no key: out = 0
    seen = l_i > 0.0
    out = tl.where(seen[:, None], tl.div_rn(acc, tl.where(seen, l_i, 1.0)[:, None]), 0.0)  # (BLOCK_M, BLOCK_D)
    bh = b * Hq + h
    o_ptrs = OUT + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    _store_row_stats(LSE, bh * Sq + offs_m, row_ok, m_i, l_i, STATS)


# --------------------------------------------------------------------------------------------------
# Decode (split-K over the keys, GQA group packed into the rows).


@triton.jit
def _attn_decode_kernel(
    Q, K, V, O_PART, ML_PART, MASK, KV_LEN,  # O_PART (NUM_SPLITS, B*Hq*Sq, D), ML_PART (NUM_SPLITS, B*Hq*Sq, 2) fp32
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, N_ROWS, ROW_BLOCKS, NUM_SPLITS,
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    HAS_KV_LEN: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (split s, kv head hk x row block, batch b): rows r of the packed (G * Sq) tile against the keys of
    chunk s of this sequence, [s * chunk, (s + 1) * chunk) with chunk = ceil(Sk_b / NUM_SPLITS) rounded up to
    BLOCK_N (so every split of a sequence gets an even share of *its* length). Writes the unnormalized acc and
    the split's (m, l) (m = -inf, l = 0, acc = 0 for a split that saw no key) to the partial buffers."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    split = tl.program_id(0)
    pid1 = tl.program_id(1)
    hk = (pid1 // ROW_BLOCKS).to(tl.int64)
    pid_r = pid1 % ROW_BLOCKS
    b = tl.program_id(2).to(tl.int64)
    if HAS_KV_LEN:
        sk_b = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Sk)
    else:
        sk_b = Sk
    if BOTTOM_RIGHT:
        offset = sk_b - Sq
    else:
        offset = 0

    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) packed row r = head_in_group * Sq + query
    row_ok = rows < G * Sq
    qi = rows % Sq  # (BLOCK_M,) query index
    h = hk * G + (rows // Sq)  # (BLOCK_M,) int64 query head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + qi.to(tl.int64)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h[:, None] * stride_mh + qi.to(tl.int64)[:, None] * stride_mi
    else:
        M_rows = MASK

    # this split's key range; the causal stop uses the last query row (every tile but tiny ones holds it)
    chunk = tl.cdiv(tl.cdiv(sk_b, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, sk_b)
    if CAUSAL:
        hi = tl.minimum(hi, Sq + offset)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # one masked pass: a split spans few blocks and the rows are few, so the element-wise test is cheap; lo is a
    # multiple of BLOCK_N, so a block never straddles two splits. qi plays offs_m's role in the causal test
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, M_rows, qi, row_ok, offs_d, lo, hi, sk_b, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip

    # partial row index: split * N_ROWS + (b * Hq + h) * Sq + qi
    prow = split.to(tl.int64) * N_ROWS + (b * Hq + h) * Sq + qi
    tl.store(O_PART + prow[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(ML_PART + prow * 2, m_i, mask=row_ok)
    tl.store(ML_PART + prow * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _attn_combine_kernel(
    O_PART, ML_PART, OUT, LSE,  # partials as in _attn_decode_kernel; OUT (N_ROWS, D); LSE lse or stats per row
    N_ROWS, D: tl.constexpr, NUM_SPLITS,
    STATS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program = one output row: m = max_s m_s, w_s = 2^(m_s - m), l = sum_s w_s l_s, out = sum_s w_s acc_s / l.
    m is the row's true max score, so the statistics (m, l) are those the FlashAttention-2 kernel would save (the
    backward may follow). Splits that saw no key have m_s = -inf, l_s = 0 and weigh 0; a row where all did gets
    out = 0, lse = +inf."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)  # (BLOCK_S,) splits
    s_ok = s < NUM_SPLITS
    prow = s.to(tl.int64) * N_ROWS + row  # (BLOCK_S,)
    m_s = tl.load(ML_PART + prow * 2, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    l_s = tl.load(ML_PART + prow * 2 + 1, mask=s_ok, other=0.0)  # (BLOCK_S,)
    m = tl.max(m_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(m_s - m_sub)  # (BLOCK_S,) rescale of each split to the common max, 0 for empty ones
    total = tl.sum(w * l_s, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.load(O_PART + prow[:, None] * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    seen = total > 0.0
    out = tl.where(seen, tl.div_rn(tl.sum(acc * w[:, None], 0), tl.where(seen, total, 1.0)), 0.0)  # (BLOCK_D,)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    _store_row_stats(LSE, row, True, m, total, STATS)


# --------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DOUT, DELTA,  # OUT, DOUT (B, Hq, Sq, D) strided; DELTA (B, Hq, Sq) fp32 contiguous
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    Hq, Sq, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id in fp32 (FlashAttention-2's D_i = rowsum(dO o O))."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    rows64 = offs_m.to(tl.int64)[:, None]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows64 * stride_os + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOUT + b * stride_db + h * stride_dh + rows64 * stride_ds + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + (b * Hq + h) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,  # dk, dv (BLOCK_N, BLOCK_D) fp32 accumulators; k, v (BLOCK_N, BLOCK_D) tiles
    Q_head, DO_head, LSE, DELTA_head, M_cols,  # this query head; M_cols (1, BLOCK_N) mask pointers or None
    bh, offs_n, offs_d, lo, hi, Sq, Sk, offset, D,
    stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query blocks [lo, hi) of one head against the program's key block.

    The scores are computed as Q K^T, in the forward's operand order, not as K Q^T (the Triton tutorial's form,
    which saves the transposes of P and dS below): the backward must reproduce the forward's s2 to the bit, or
    P = exp2(s2 - m) / l inherits their difference. Dot products summed in another order differ by an ulp or
    more (they do in the interpreter), and with peaked rows (|s2| ~ 30) one ulp of s2 is a 2e-6 relative error
    on P, which put fp32 dV past the 2x-eager criterion in the tests here.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d[None, :] < D
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0  # (BLOCK_M,) query rows
        m_ok = offs_m < Sq
        rows64 = offs_m.to(tl.int64)
        q = tl.load(Q_head + rows64[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        do = tl.load(DO_head + rows64[:, None] * stride_dos + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        # padded rows get m = +inf: their P is exactly 0 (and q = dO = 0 there anyway)
        m, inv_l = _load_row_stats(LSE, bh * Sq + offs_m, m_ok, STATS)  # (BLOCK_M,) each
        delta = tl.load(DELTA_head + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        qk = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            mvals = tl.load(M_cols + rows64[:, None] * stride_mi, mask=m_ok[:, None] & (offs_n[None, :] < Sk), other=0)
        else:
            mvals = None
        p = _bwd_probs(qk, mvals, m, inv_l, qk_scale, sm_scale, HAS_MASK, MASK_BOOL, STATS)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            # only causality here: keys >= Sk are padding columns whose dK/dV rows are never stored
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + offset, p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_N, BLOCK_D) += P^T dO
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N); dS without the scale
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_N, BLOCK_D) += dS^T Q
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, MASK,  # DK, DV (B, Hkv, Sk, D) contiguous; LSE lse or stats; DELTA fp32
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, sm_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (key block, kv head hk, batch b): dK, dV of keys [n0, n0 + BLOCK_N), summed over the G query heads
    of the group: dV = sum P^T dO, dK = scale * sum dS^T Q. Per head, the query blocks that cannot see the block
    are skipped; the ones on the causal diagonal are masked, the rest are full."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) keys
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Sk
    d_ok = offs_d < D
    cols64 = offs_n.to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b * stride_kb + hk * stride_kh + cols64[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + b * stride_vb + hk * stride_vh + cols64[:, None] * stride_vs + offs_d[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D), held for the whole program
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if BOTTOM_RIGHT:
        offset = Sk - Sq
    else:
        offset = 0
    if CAUSAL:
        # row i sees key j iff i >= j - offset: rows below n0 - offset see nothing of this block, rows from
        # n0 + BLOCK_N - 1 - offset on see all of it (clamped to >= 0 before // and cdiv, which truncate)
        lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
        full_start = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(full_start, Sq)
    else:
        lo = 0
        full_start = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g  # int64 query head of the group
        bh = b * Hq + h
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DOUT + b * stride_dob + h * stride_doh
        DELTA_head = DELTA + bh * Sq
        if HAS_MASK:
            M_cols = MASK + b * stride_mb + h * stride_mh + cols64[None, :] * stride_mj  # (1, BLOCK_N)
        else:
            M_cols = MASK
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE, DELTA_head, M_cols, bh, offs_n, offs_d, lo, mid, Sq, Sk, offset, D,
            stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
            True, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_M,
        )  # fmt: skip
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, LSE, DELTA_head, M_cols, bh, offs_n, offs_d, full_start, Sq, Sq, Sk,
            offset, D, stride_qs, stride_dos, stride_mi, qk_scale, sm_scale,
            False, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_M,
        )  # fmt: skip

    dk = dk * sm_scale  # dK = scale * dS^T Q
    out_off = (b * (Hq // G) + hk) * Sk * D + offs_n[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, m, inv_l, delta,  # dq (BLOCK_M, BLOCK_D) fp32; q, do (BLOCK_M, BLOCK_D); m, inv_l, delta (BLOCK_M,)
    K_head, V_head, M_rows,
    offs_m, offs_d, lo, hi, Sq, Sk, offset, D,
    stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks [lo, hi) of one query tile: dQ += dS K with dS = P * (dO V^T - delta)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d[None, :] < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0  # (BLOCK_N,)
        cols64 = cols.to(tl.int64)
        kv_ok = cols[:, None] < Sk
        k = tl.load(K_head + cols64[:, None] * stride_ks + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        v = tl.load(V_head + cols64[:, None] * stride_vs + offs_d[None, :], mask=kv_ok & d_ok, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        if HAS_MASK:
            m_ok = (offs_m[:, None] < Sq) & (cols[None, :] < Sk)
            mvals = tl.load(M_rows + cols64[None, :] * stride_mj, mask=m_ok, other=0)  # (BLOCK_M, BLOCK_N)
        else:
            mvals = None
        p = _bwd_probs(qk, mvals, m, inv_l, qk_scale, sm_scale, HAS_MASK, MASK_BOOL, STATS)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            vis = cols[None, :] < Sk  # padded keys load k = 0 and would get exp2(-m) > 0
            if CAUSAL:
                vis = vis & (cols[None, :] <= offs_m[:, None] + offset)
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N), without the scale
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)  # (BLOCK_M, BLOCK_D)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, MASK,  # DQ (B, Hq, Sq, D) contiguous
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_mb, stride_mh, stride_mi, stride_mj,
    Hq, G, Sq, Sk, D: tl.constexpr, qk_scale, sm_scale,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query block, head h, batch b): dQ = scale * dS K over the key blocks the tile can see, full blocks
    first, then the masked ones (the forward's causal bounds)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    bh = b * Hq + h
    if BOTTOM_RIGHT:
        offset = Sk - Sq
    else:
        offset = 0
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    ok = m_ok[:, None] & (offs_d[None, :] < D)
    rows64 = offs_m.to(tl.int64)
    q_ptrs = Q + b * stride_qb + h * stride_qh + rows64[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = DOUT + b * stride_dob + h * stride_doh + rows64[:, None] * stride_dos + offs_d[None, :]
    q = tl.load(q_ptrs, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(do_ptrs, mask=ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    m, inv_l = _load_row_stats(LSE, bh * Sq + offs_m, m_ok, STATS)  # (BLOCK_M,) each
    delta = tl.load(DELTA + bh * Sq + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    K_head = K + b * stride_kb + hk * stride_kh
    V_head = V + b * stride_vb + hk * stride_vh
    if HAS_MASK:
        M_rows = MASK + b * stride_mb + h * stride_mh + rows64[:, None] * stride_mi  # (BLOCK_M, 1)
    else:
        M_rows = MASK

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_bounds(m0, Sq, Sk, offset, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, m, inv_l, delta, K_head, V_head, M_rows, offs_m, offs_d, 0, full_end, Sq, Sk, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
        False, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, m, inv_l, delta, K_head, V_head, M_rows, offs_m, offs_d, full_end, hi, Sq, Sk, offset, D,
        stride_ks, stride_vs, stride_mj, qk_scale, sm_scale,
        True, CAUSAL, HAS_MASK, MASK_BOOL, STATS, DOT_PRECISION, DOT_UPCAST, BLOCK_N,
    )  # fmt: skip
    dq = dq * sm_scale  # dQ = scale * dS K
    tl.store(DQ + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=ok)


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
_MMA_CONFIGS = {
    "_attn_fwd_kernel": {
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3),
              (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 8, 2)],
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
    return triton.autotune(configs=configs, key=_TUNE_KEY)(globals()[name])


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    globals()[name][grid(bm, bn)](
        *args, **consts, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=4, num_stages=2 if on_gpu else 1, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip


def _mask_args(mask: torch.Tensor | None) -> tuple:
    """(MASK, its 4 strides, MASK_BOOL) for a mask viewed as (B, Hq, Sq, Sk) or None."""
    if mask is None:
        return None, (0, 0, 0, 0), False
    return mask, tuple(mask.stride()), mask.dtype == torch.bool


def _dot_args(q: torch.Tensor) -> dict:
    """DOT_PRECISION: fp32 tiles take IEEE fp32 products (no TF32 rounding of q, k, p, v); 16-bit tiles ignore it.
    DOT_UPCAST: bfloat16 under the interpreter (see _dot)."""
    return dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.device.type != "cuda" and q.dtype == torch.bfloat16,
    )


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
        HAS_KV_LEN=kv_len is not None, BLOCK_D=block_d, **_dot_args(q),
    )  # fmt: skip
    with _device_ctx(q):
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
            sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
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
        STATS=lse.dim() == 4, BLOCK_D=block_d, **_dot_args(q),
    )  # fmt: skip
    with _device_ctx(q):
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
