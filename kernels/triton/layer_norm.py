"""Fused (add +) LayerNorm / RMSNorm, forward and backward, in Triton.

Glossary: M rows (leading dims flattened), N hidden size, BLOCK_N columns per tile, G backward programs.
h = round_T(x + residual) (or x), xhat = (h - mean) * rstd (LN) or h * rstd (RMS), T the storage dtype.

Forward, one program per row:  mean = sum(h)/N,  var = sum((h - mean)^2)/N (two-pass),  rstd = 1/sqrt(var+eps),
    out = xhat * w + b.  Rows up to BLOCK_N = 64 KiB / element size stay in registers (one load); longer rows
    loop over BLOCK_N chunks in three passes (sum, centered sum of squares, normalize), re-reading from L2.
Backward, G programs each owning a contiguous range of rows (FA/Apex-style recompute: only h is saved):
    g = dy * w,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh   (RMS: no mean(g) term),
    dw = sum_rows dy * xhat,  db = sum_rows dy, accumulated per program in fp32 and written to a (G, N) buffer
    that torch sums over G: deterministic, no atomics (the partial-sum scheme of Triton's layer-norm tutorial).
All statistics and arithmetic are fp32; every output is rounded once.
"""

import torch
import triton
import triton.language as tl

MAX_FUSED_BYTES = 65536  # a row up to this size is held in registers by one program


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, H,  # Y, H: (M, N) contiguous outputs; X, R: (M, N) with row strides
    stride_x, stride_r, N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """One row per program: out = (h - mean) * rstd * w + b with h = round_T(x + r)."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr = X + row * stride_x
    r_ptr = R + row * stride_r
    y_ptr = Y + row * N
    h_ptr = H + row * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        h = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
        if HAS_RES:
            hs = (h + tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(h_ptr + cols, hs, mask=mask)
            h = hs.to(tl.float32)  # statistics from h as stored, so the backward's recompute agrees
        if IS_RMS:
            xc = h
        else:
            mean = tl.sum(h, axis=0) / N
            xc = tl.where(mask, h - mean, 0.0)  # padded lanes must not enter the variance
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: h (stored once), sum or sum of squares
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                hs = (h + tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                tl.store(h_ptr + cols, hs, mask=mask)
                h = hs.to(tl.float32)
            if IS_RMS:
                acc += h * h
            else:
                acc += h
        if IS_RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / N
        else:
            # pass 2: centered sum of squares; h is recomputed from x (+ r) exactly as rounded in pass 1
            mean = tl.sum(acc, axis=0) / N
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    h = (h + tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                    h = h.to(tl.float32)
                d = tl.where(mask, h - mean, 0.0)
                acc2 += d * d
            var = tl.sum(acc2, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        # pass 3: normalize
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            h = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                h = (h + tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                h = h.to(tl.float32)
            y = (h - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, DH, Hin, W, DX, DWP, DBP,  # DX (M, N) contiguous; DWP, DBP (G, N) fp32 partial sums
    stride_dy, stride_dh, stride_h, M, N, eps, rows_per_prog,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    """Rows [pid * rows_per_prog, ...) of dx, and this program's partial dw / db."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_prog  # int64 bounds: the loop index r is int64, so r * stride cannot overflow
    row_end = tl.minimum(row_start + rows_per_prog, M)
    part = pid * N
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in range(row_start, row_end):
            h = tl.load(Hin + r * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                xc = h
            else:
                xc = tl.where(mask, h - tl.sum(h, axis=0) / N, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
            xhat = xc * rstd  # (BLOCK_N,), 0 on padded lanes
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * w if HAS_W else dy
            c1 = tl.sum(g * xhat, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                dx = (g - xhat * c1 - tl.sum(g, axis=0) / N) * rstd
            if HAS_DH:
                dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        tl.store(DWP + part + cols, dw_acc, mask=mask)
        tl.store(DBP + part + cols, db_acc, mask=mask)
    else:
        for r in range(row_start, row_end):
            h_ptr = Hin + r * stride_h
            dy_ptr = DY + r * stride_dy
            # statistics (two passes for LN)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                h = tl.load(h_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
                acc += h * h if IS_RMS else h
            if IS_RMS:
                mean = 0.0
                var = tl.sum(acc, axis=0) / N
            else:
                mean = tl.sum(acc, axis=0) / N
                acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
                for off in range(0, N, BLOCK_N):
                    cols = off + tl.arange(0, BLOCK_N)
                    mask = cols < N
                    d = tl.where(mask, tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
                    acc2 += d * d
                var = tl.sum(acc2, axis=0) / N
            rstd = 1.0 / tl.sqrt(var + eps)
            # row reductions sum(g * xhat), sum(g), and the partial dw / db (this program's row of DWP/DBP)
            sgx = tl.zeros([BLOCK_N], dtype=tl.float32)
            sg = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (h - mean) * rstd, 0.0)
                dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else dy
                sgx += g * xhat
                sg += g
                dwp = tl.load(DWP + part + cols, mask=mask, other=0.0)
                tl.store(DWP + part + cols, dwp + dy * xhat, mask=mask)
                dbp = tl.load(DBP + part + cols, mask=mask, other=0.0)
                tl.store(DBP + part + cols, dbp + dy, mask=mask)
            c1 = tl.sum(sgx, axis=0) / N
            c2 = 0.0 if IS_RMS else tl.sum(sg, axis=0) / N
            # dx
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                h = tl.load(h_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = (h - mean) * rstd
                dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else dy
                dx = (g - xhat * c1 - c2) * rstd
                if HAS_DH:
                    dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


def _blocks(n: int, elem: int, block_n: int | None) -> tuple[int, bool, int]:
    """(BLOCK_N, whole row in one block?, num_warps). block_n forces a smaller tile (tests of the loop)."""
    cap = MAX_FUSED_BYTES // elem if block_n is None else block_n
    block = min(triton.next_power_of_2(cap), triton.next_power_of_2(n))
    # ~8-16 elements per thread: 1 warp up to 256 columns, 16 warps from 4096 up
    num_warps = min(max(block // 256, 1), 16)
    return block, n <= block, num_warps


def norm_fwd(x, residual, weight, bias, eps: float, is_rms: bool, block_n: int | None = None):
    """x, residual (M, N) with unit column stride; weight, bias (N,) or None. Returns (out, h or None)."""
    m, n = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if residual is not None else None
    block, single, num_warps = _blocks(n, x.element_size(), block_n)
    _norm_fwd_kernel[(m,)](
        x, residual if residual is not None else x, weight if weight is not None else x,
        bias if bias is not None else x, out, h if h is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, n, eps,
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_N=block, SINGLE=single, num_warps=num_warps,
    )  # fmt: skip
    return out, h


def _num_programs(x: torch.Tensor, m: int) -> int:
    if x.is_cuda:
        return min(m, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(m, 4)


def norm_bwd(dy, dh, h, weight, has_bias: bool, eps: float, is_rms: bool, block_n: int | None = None):
    """dy, dh, h (M, N) with unit column stride. Returns (dx, dw or None, db or None)."""
    m, n = h.shape
    dx = torch.empty((m, n), dtype=h.dtype, device=h.device)
    g = _num_programs(h, m)
    rows_per_prog = triton.cdiv(m, g)
    g = triton.cdiv(m, rows_per_prog)
    dwp = torch.zeros((g, n), dtype=torch.float32, device=h.device)
    dbp = torch.zeros((g, n), dtype=torch.float32, device=h.device)
    block, single, num_warps = _blocks(n, h.element_size(), block_n)
    _norm_bwd_kernel[(g,)](
        dy, dh if dh is not None else dy, h, weight if weight is not None else h, dx, dwp, dbp,
        dy.stride(0), dh.stride(0) if dh is not None else 0, h.stride(0), m, n, eps, rows_per_prog,
        IS_RMS=is_rms, HAS_DH=dh is not None, HAS_W=weight is not None,
        BLOCK_N=block, SINGLE=single, num_warps=num_warps,
    )  # fmt: skip
    dw = dwp.sum(0).to(weight.dtype) if weight is not None else None
    db = dbp.sum(0).to(h.dtype) if has_bias else None
    return dx, dw, db
