"""Fused LayerNorm / RMSNorm with an optional residual add, forward and backward, in Triton.

Glossary
    M         rows: all leading dims of the input flattened
    N         hidden size: the normalized (last) dim, any value >= 1 (not only powers of two)
    T         the storage dtype of x / residual / outputs: float32, bfloat16 or float16
    h         the normalized input: round_T(x + residual) with a residual, else x
    mean      per-row mean of h (LayerNorm only; RMSNorm uses 0)
    rstd      per-row 1 / sqrt(var + eps); var = mean((h - mean)^2) (LN, two-pass) or mean(h^2) (RMS)
    xhat      (h - mean) * rstd
    g         dy * weight (dy when there is no weight)
    BLOCK_N   columns one program holds at a time (a power of two); a row with N <= BLOCK_N is "single-block"
              and lives in registers, a longer row is processed in ceil(N / BLOCK_N) column chunks ("looped")
    SINGLE_BLOCK  constexpr flag: N <= BLOCK_N (one register tile per row) rather than the looped kernel body
    G         number of backward programs; each owns a contiguous range of rows and row `pid` of the (G, N)
              fp32 partial-sum buffers of dW and dB, which torch then sums over G

All statistics and arithmetic are fp32; every output is rounded to its dtype once. The statistics are computed
from h as stored (rounded to T), so a backward that recomputes them from the saved h agrees with the forward.
Padded lanes (column >= N) load 0 and are masked to 0 wherever they could enter a sum; NaN/Inf in real lanes
are never masked, so they spread over their row as in torch.nn.functional.layer_norm.
Row offsets are int64 (the row index is an int64 program id or loop variable), so M * N >= 2^31 cannot overflow.
rstd = 1 / sqrt(var + eps) uses IEEE sqrt and division (tl.sqrt_rn, tl.div_rn; tl.sqrt and / lower to approximate
instructions on NVIDIA GPUs): one per row, so a correctly rounded rstd costs nothing.
Under TRITON_INTERPRET=1, fp32 -> bfloat16 casts round toward zero (the interpreter's emulation); compiled kernels
round to nearest even like torch, so a bfloat16 h can differ from x + residual by one ulp only in the interpreter.
"""

import torch
import triton
import triton.language as tl
from fastllm.kernels.triton._launch import device_ctx, sm_count

# Single-block caps, in elements: the tile is held in registers as fp32 whatever T is, so the budget is in fp32
# values, against 64K 32-bit registers per SM (at most 255 per thread). Forward: h (then xhat) plus a weight or
# bias tile live at once, 2-3 x 16384 values = 32-48K registers, 64-96 per thread at 16 warps; this is the 64 KiB
# of an fp32 row (Triton's tutorial uses 64 KiB // element size, but a 32768-wide 16-bit row upcast to fp32 would
# take half the register file for h alone and spill). Backward: about five vectors are live at the peak (dy, g,
# xhat and the dW / dB accumulators), 5 x 8192 = 40K registers, 80 per thread at 16 warps, under the 128 that 512
# threads may each use. Longer rows loop over chunks of the cap, so the looped passes are few and wide.
FWD_MAX_BLOCK_N = 16384
BWD_MAX_BLOCK_N = 8192
MAX_WARPS = 16
# Backward programs when not on CUDA (the interpreter runs programs one after another; a few still exercise
# the multi-program partial-sum reduction).
CPU_BWD_PROGRAMS = 4
# A backward program sums dW / dB over at most this many rows, one after another in fp32; torch then sums the
# G partial rows with its (tree-like) reduction. The rounding error of dW / dB so grows like 32 + log(G) terms,
# not like M terms (a 4099-row fp32 dW summed in 4 sequential runs of 1025 rows misses the 2x-eager bound).
# Where this bound sets G (large M), the partial buffers have M / 32 rows: their write and re-read add 8 / 32 B per
# element and buffer, about 3% of the 8 (16-bit) or 16 (fp32) bytes per element that dy, h, dh and dx move.
MAX_ROWS_PER_PROGRAM = 32


@triton.jit
def _load_h(x_row, R, H, row, stride_r, N, c, mask, HAS_RES: tl.constexpr):
    """h at columns c (BLOCK_N,) of row `row`, fp32, padded lanes 0: x, or with a residual round_T(x + r), also
    stored to H (h is rounded to T once: it is an output, and the statistics must see what the backward reloads)."""
    h = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
        h_t = h.to(H.dtype.element_ty)
        tl.store(H + row * N + c, h_t, mask=mask)
        h = h_t.to(tl.float32)
    return h


@triton.jit
def _looped_stats(h_row, acc, N, eps, IS_RMS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mean, rstd) of the row h_row[:N] of a looped kernel, from acc (BLOCK_N,), the per-lane sums of h (LN) or
    h^2 (RMS) of pass 1. RMS: mean = 0, var = sum(h^2) / N. LN: a second pass over the stored row takes the centered
    sum of squares (two-pass variance, no E[h^2] - E[h]^2 cancellation)."""
    if IS_RMS:
        mean = 0.0
        var = tl.sum(acc, axis=0) / N  # (BLOCK_N,) -> scalar
    else:
        mean = tl.sum(acc, axis=0) / N
        cols = tl.arange(0, BLOCK_N)
        acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            h = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, h - mean, 0.0)  # padded lanes would hold -mean
            acc2 += d * d
        var = tl.sum(acc2, axis=0) / N
    return mean, tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, OUT, H,  # X, R: (M, N) with row strides; W, B: (N,); OUT, H: (M, N) contiguous
    stride_x, stride_r,  # row strides of X and R (column stride 1)
    N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per row: h = round_T(x + r) (stored to H) or x; out = (h - mean) * rstd * w + b.

    LN: mean = sum(h) / N, var = sum((h - mean)^2) / N; RMS: mean = 0, var = sum(h^2) / N; rstd = 1/sqrt(var + eps).
    SINGLE_BLOCK (N <= BLOCK_N): the row is loaded once into a (BLOCK_N,) register tile.
    Looped (N > BLOCK_N): chunks of BLOCK_N columns in three passes: (1) load x [+ r], store h, accumulate sum(h)
    or sum(h^2); (2, LN only) accumulate sum((h - mean)^2), re-reading h from H (residual) or X; (3) normalize.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    out_row = OUT + row * N
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    if SINGLE_BLOCK:
        mask = cols < N
        h = _load_h(x_row, R, H, row, stride_r, N, cols, mask, HAS_RES)  # (BLOCK_N,), padded lanes 0
        if IS_RMS:
            xhat = h * tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=0) / N + eps))  # (BLOCK_N,) -> scalar
        else:
            mean = tl.sum(h, axis=0) / N  # (BLOCK_N,) -> scalar
            d = tl.where(mask, h - mean, 0.0)  # padded lanes would hold -mean
            xhat = d * tl.div_rn(1.0, tl.sqrt_rn(tl.sum(d * d, axis=0) / N + eps))
        y = xhat
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, y.to(OUT.dtype.element_ty), mask=mask)
    else:
        # pass 1: h chunk by chunk; acc holds per-lane partial sums of h (LN) or h^2 (RMS)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            h = _load_h(x_row, R, H, row, stride_r, N, c, mask, HAS_RES)
            if IS_RMS:
                acc += h * h
            else:
                acc += h
        # later passes re-read h: the stored H with a residual (same lanes, same thread), else x itself
        if HAS_RES:
            h_row = H + row * N
        else:
            h_row = x_row
        mean, rstd = _looped_stats(h_row, acc, N, eps, IS_RMS, BLOCK_N)  # pass 2 (LN only) inside
        # pass 3: normalize and store
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            h = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
            y = (h - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + c, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, DH, H, W, DX, DW_PART, DB_PART,  # DY, DH, H: (M, N) with row strides; W: (N,); DX: (M, N) contiguous
    stride_dy, stride_dh, stride_h,  # row strides (column stride 1); DW_PART, DB_PART: (G, N) fp32
    M, N, rows_per_prog, eps,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):  # fmt: skip
    """Program pid takes rows [pid * rows_per_prog, min((pid + 1) * rows_per_prog, M)).

    Per row (mean, rstd recomputed from h as in the forward; xhat = (h - mean) * rstd, g = dy * w):
        LN:  dx = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat)) + dh
        RMS: dx = rstd * (g - xhat * mean_N(g * xhat)) + dh
    and the program's partial sums dW_part[pid] = sum_rows dy * xhat, dB_part[pid] = sum_rows dy (fp32),
    reduced over pid by the launcher: deterministic, no atomics (the partial-dW scheme of the Triton tutorial
    "Layer Normalization", without its locks since each program owns its buffer row).
    SINGLE_BLOCK (N <= BLOCK_N): each row is one register tile, the partials stay in registers, stored once.
    Looped (N > BLOCK_N): per row, pass 1 the statistics (LN: sum, then centered sum of squares; RMS: sum of
    squares), pass 2 sum(g), sum(g * xhat) and a read-modify-write of the program's own partial row, pass 3 dx.
    """
    pid = tl.program_id(0).to(tl.int64)
    # int64 loop bounds make the row index (the loop variable) int64, so row * stride cannot overflow
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    part_off = pid * N  # this program's row of the (G, N) partial buffers
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    if SINGLE_BLOCK:
        mask = cols < N
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,) sum over this program's rows of dy * xhat
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,) sum of dy
        for row in range(row_start, row_end):
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)  # padded lanes 0
            if IS_RMS:
                rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(h * h, axis=0) / N + eps))  # (BLOCK_N,) -> scalar
                xhat = h * rstd  # padded lanes: h = 0
            else:
                mean = tl.sum(h, axis=0) / N  # (BLOCK_N,) -> scalar
                d = tl.where(mask, h - mean, 0.0)  # padded lanes would hold -mean
                rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(d * d, axis=0) / N + eps))
                xhat = d * rstd
            if HAS_W:
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                g = dy
            # the two row means of the backward: (BLOCK_N,) -> scalar each; padded lanes have g = xhat = 0
            c_gx = tl.sum(g * xhat, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c_gx) * rstd
            else:
                dx = (g - tl.sum(g, axis=0) / N - xhat * c_gx) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if HAS_W:
            tl.store(DW_PART + part_off + cols, dw_acc, mask=mask)
        if HAS_DB:
            tl.store(DB_PART + part_off + cols, db_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            h_row = H + row * stride_h
            dy_row = DY + row * stride_dy
            # pass 1: statistics, acc holds per-lane partial sums of h (LN) or h^2 (RMS)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                h = tl.load(h_row + c, mask=c < N, other=0.0).to(tl.float32)
                if IS_RMS:
                    acc += h * h
                else:
                    acc += h
            mean, rstd = _looped_stats(h_row, acc, N, eps, IS_RMS, BLOCK_N)
            # pass 2: row sums of g and g * xhat; this program's partial dW / dB rows, read-modify-write
            # (only this program touches its buffer row, and each lane is reloaded by the thread that stored it)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,)
            acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)  # (BLOCK_N,)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                h = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = dy
                acc_g += g
                acc_gx += g * xhat
                if HAS_W:
                    dw = tl.load(DW_PART + part_off + c, mask=mask, other=0.0)
                    tl.store(DW_PART + part_off + c, dw + dy * xhat, mask=mask)
                if HAS_DB:
                    db = tl.load(DB_PART + part_off + c, mask=mask, other=0.0)
                    tl.store(DB_PART + part_off + c, db + dy, mask=mask)
            c_g = tl.sum(acc_g, axis=0) / N  # (BLOCK_N,) -> scalar
            c_gx = tl.sum(acc_gx, axis=0) / N
            # pass 3: dx
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                h = tl.load(h_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                xhat = (h - mean) * rstd
                if HAS_W:
                    g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    g = dy
                if IS_RMS:
                    dx = (g - xhat * c_gx) * rstd
                else:
                    dx = (g - c_g - xhat * c_gx) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers. The caller (fastllm.ops.layer_norm) has validated shapes, dtypes, devices and strides.


def _block_n(n: int, cap: int, block_n: int | None) -> tuple[int, bool]:
    """(BLOCK_N, single_block): the row's next power of two, at most `cap` (or the test override block_n)."""
    if block_n is not None:
        if block_n < 1 or block_n & (block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 1, got {block_n}")
        cap = block_n
    bn = min(triton.next_power_of_2(n), cap)
    return bn, bn >= n


def _num_warps(block: int) -> int:
    """One warp per 256 columns of the tile (8 fp32 values per thread: two 16-byte loads of fp32, one of 16-bit),
    1 to 16 warps: 1024 columns -> 4 warps, 4096 and more -> 16."""
    return min(MAX_WARPS, max(1, block // 256))


def _bwd_programs(m: int, num_warps: int, single_block: bool, device: torch.device) -> int:
    """G, the number of backward programs: at least M / MAX_ROWS_PER_PROGRAM (accuracy of dW / dB), at most M.

    CUDA, single-block: 32 // num_warps programs per SM (1 to 32), about 32 resident warps per SM to keep enough
    rows in flight to hide memory latency.
    CUDA, looped (N > BWD_MAX_BLOCK_N): one program per SM, so the partial rows being read-modify-written
    (SMs * N * 4 B per buffer: 8 MiB at N = 16384 on an H100) stay in L2.
    Elsewhere (the interpreter): CPU_BWD_PROGRAMS.
    """
    if device.type == "cuda":
        per_sm = 1 if not single_block else min(32, max(1, 32 // num_warps))
        programs = sm_count(device) * per_sm
    else:
        programs = CPU_BWD_PROGRAMS
    return max(1, min(m, max(programs, triton.cdiv(m, MAX_ROWS_PER_PROGRAM))))


def norm_fwd(x, residual, weight, bias, eps: float, is_rms: bool, *, block_n: int | None = None):
    """Forward of the four norm ops; the caller has validated everything.

    x: (M, N) with x.stride(1) == 1 (row stride x.stride(0) arbitrary, >= N). residual: None or (M, N) like x (own
    row stride). weight, bias: None or contiguous (N,) of x.dtype. Same device, dtype float32 / bfloat16 / float16;
    M >= 1, N >= 1. Returns (out, h): out (M, N) contiguous in x.dtype; h = x + residual rounded to x.dtype, (M, N)
    contiguous, when residual is given, else None. Statistics in fp32 from h as rounded:
        LN  (is_rms False): out = (h - mean) * rstd * weight + bias, var = sum((h - mean)^2) / N (two-pass)
        RMS (is_rms True):  out = h * rstd * weight, rstd = 1 / sqrt(sum(h^2) / N + eps)   (bias is None)
    weight None means 1, bias None means 0; out is rounded once from fp32.
    block_n (a power of two, for tests) caps BLOCK_N: block_n < N forces the looped kernel at small N.
    """
    m, n = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    block, single = _block_n(n, FWD_MAX_BLOCK_N, block_n)
    with device_ctx(x):
        _norm_fwd_kernel[(m,)](
            x, residual, weight, bias, out, h,
            x.stride(0), residual.stride(0) if residual is not None else 0,
            n, eps,
            IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, SINGLE_BLOCK=single,
            # no software pipelining: the looped passes re-read h that this program just stored
            num_warps=_num_warps(block), num_stages=1,
        )  # fmt: skip
    return out, h


def norm_bwd(dy, dh, h, weight, has_bias: bool, eps: float, is_rms: bool, *, block_n: int | None = None):
    """Backward of the four norm ops; the caller has validated everything.

    dy: (M, N), stride(1) == 1, the grad of out. dh: None or (M, N), stride(1) == 1, an extra grad flowing into h
    (the add-variants return h as a second output), added to dx. h: (M, N), stride(1) == 1, the normalized input
    (x itself for the non-residual ops); mean / rstd are recomputed from it in fp32. weight: None or (N,).
    Returns (dx, dw, db): dx (M, N) contiguous in h.dtype; dw (N,) in weight.dtype, None without weight; db (N,) in
    h.dtype when has_bias, else None. With xhat = (h - mean) * rstd (RMS: h * rstd) and g = dy * weight (or dy):
        LN:  dx = rstd * (g - mean_N(g) - xhat * mean_N(g * xhat)) + dh
        RMS: dx = rstd * (g - xhat * mean_N(g * xhat)) + dh
        dw = sum over rows of dy * xhat, db = sum over rows of dy (fp32, deterministic: per-program partial rows
        summed over programs by torch, no atomics).
    block_n (a power of two, for tests) caps BLOCK_N: block_n < N forces the looped kernel at small N.
    """
    m, n = h.shape
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    block, single = _block_n(n, BWD_MAX_BLOCK_N, block_n)
    num_warps = _num_warps(block)
    programs = _bwd_programs(m, num_warps, single, h.device)
    rows_per_prog = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_prog)  # G: every program gets at least one row
    # single-block programs store their partial rows once; looped ones accumulate into them, so start at 0
    alloc = torch.empty if single else torch.zeros
    dw_part = alloc((programs, n), dtype=torch.float32, device=h.device) if weight is not None else None
    db_part = alloc((programs, n), dtype=torch.float32, device=h.device) if has_bias else None
    with device_ctx(h):
        _norm_bwd_kernel[(programs,)](
            dy, dh, h, weight, dx, dw_part, db_part,
            dy.stride(0), dh.stride(0) if dh is not None else 0, h.stride(0),
            m, n, rows_per_prog, eps,
            IS_RMS=is_rms, HAS_DH=dh is not None, HAS_W=weight is not None, HAS_DB=has_bias,
            BLOCK_N=block, SINGLE_BLOCK=single,
            # no software pipelining: the looped pass 2 re-reads the partial rows it stored on the previous row
            num_warps=num_warps, num_stages=1,
        )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    db = db_part.sum(0).to(h.dtype) if has_bias else None
    return dx, dw, db
