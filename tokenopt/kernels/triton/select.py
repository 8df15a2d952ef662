"""Fused token selection: ATS sampling (dense and packed) and EViT top-k with the gather.

Each launcher equals a chain of :mod:`tokenopt.kernels.reference` functions:

* :func:`ats_select_dense` = ``cls_attention`` (bias from ``valid``) -> ``ats_scores`` -> ``ats_select``
* :func:`ats_select_packed` = ``packed_cls_scores`` -> ``ats_scores_from_norms`` -> ``ats_select``
* :func:`topk_gather` = ``cls_attention`` -> ``topk_select`` -> ``gather_tokens`` (-> ``evit_fuse``, cat)

ATS runs in two launches:

1. ``_ats_keep_kernel``, one program per image. Per head it forms the CLS query row's logits over the
   image's keys (``q_cls . k``, tiled over the head dim), takes their softmax and adds it up over the
   heads; the same loop sums the squared values, giving each token's value norm over heads and head
   dim. Score = summed attention x value norm on the valid patch tokens, normalised to sum 1. Then the
   reference's inverse-transform sampling, in sorted order: one ``tl.sort`` of int64 keys packing the
   score bits (non-negative floats order as their bits) with the patch index yields the sorted scores
   and the permutation; ``tl.cumsum`` gives the CDF; a sorted position is picked when at least one
   point ``(i + 0.5) / K`` falls on its CDF step (what ``searchsorted`` + scatter do, see
   ``_count_points_le``); then the validity mask and the ``min_tokens`` floor; the keep mask
   ``[B, Np]`` is scattered back to token order with the per-image counts.
2. ``_compact_kernel``, one program per image: the reference's ``_indices_of`` (prefix first, kept
   patch tokens in original order, padding with index 0 / ``valid=False`` up to the batch's largest
   count). The output width is that largest count, read on the host between the launches (the one
   device sync, which the reference has too).

Top-k runs in two launches: ``_topk_select_kernel`` (one program per image: head-averaged CLS
attention, the ``keep``-th largest key by ``tl.sort``, kept tokens in original order, and the
EViT weights of the dropped tokens) and ``_gather_fuse_kernel`` (row copies plus the weighted sum of
the dropped tokens as one extra row).

Matching the reference. The kernels round where the reference rounds: ``q k^T`` (and, in the dense
form, its product with ``scale`` and the sum with the bias) in the input dtype, the softmax in fp32,
the attention rows back to the input dtype; everything else accumulates in fp32 (the CDF in fp64 then
rounded to fp32, as PyTorch's CPU ``cumsum`` does). The sampling points come from the same PyTorch
expression as in the reference, computed on the device once per ``(K, device)``. So for fp32 inputs
the kept set equals the reference's unless a point lies within a few ulps of a CDF step.

Ties. The reference sorts with the default, unstable ``torch.sort`` (whose order on ties PyTorch does
not specify, and which is not stable on CPU for 64+ elements). Here ties are broken explicitly:
invalid tokens (padding; their score is 0) rank below every valid token, and equal valid scores rank
by patch index (higher index = later in the ascending sort, as a stable sort). The only ties that
occur in practice are those zero scores of padding, and with this order they can never take a
sampling pick or a ``min_tokens`` slot from a valid token. For top-k, equal scores prefer the lower
index (``torch.topk`` does not specify).

Edge cases where the reference raises and the kernels do not: no patch tokens (``N == num_prefix``,
or a packed batch whose longest image has at most ``num_prefix`` tokens) keeps the prefix only;
packed images of length 0 anywhere in the batch (the reference indexes past ``T`` for a trailing one)
keep their prefix entries, flagged valid as the reference flags them for shorter images.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported). q/k/v may be any strided views (e.g. of a fused qkv projection).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["ats_select_dense", "ats_select_packed", "topk_gather"]

# one program holds all of an image's tokens (the sort and the CDF are over the whole image)
_MAX_TOKENS = 8192
# elements of a 2-D tile ([BLOCK_N, BLOCK_D] of k or v, [BLOCK_J, BLOCK_NP] of the sampling
# comparisons): bounds registers per program on GPUs. Triton's CPU interpreter pays per operation,
# not per element, so CPU tensors get larger tiles (tests lower this to exercise the tiled loops).
_TILE_ELEMS = {"cuda": 4096, "cpu": 32768}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT64_MAX = 0x7FFFFFFFFFFFFFFF


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _cls_attention_sum(
    Q, K, V, BIAS,
    q_off, k_off, v_off, bias_off, row0, tok, key_ok, has_q,
    D, H, scale,
    stride_qh, stride_qn, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_vh, stride_vn, stride_vd,
    stride_bias_n,
    WITH_V: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_IN_INPUT_DTYPE: tl.constexpr,
    ROUND_BIASED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """CLS attention summed over heads ``[BLOCK_N]`` and, with ``WITH_V``, squared value norms.

    Row ``row0`` is the CLS query; ``tok`` are the key rows (token-axis offsets from ``row0``), of
    which ``key_ok`` take part in the softmax. Roundings follow ``reference.cls_attention`` (dense:
    logits and their scaled, biased value in the input dtype) or ``reference.packed_cls_scores``
    (``SCALE_IN_INPUT_DTYPE=False``: only ``q k^T`` in the input dtype, scaled in fp32).
    """
    dtype = Q.dtype.element_ty
    rows = (row0 + tok).to(tl.int64)
    cls_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    vsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in range(H):
        logit = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            qd = tl.load(Q + q_off + h * stride_qh + row0 * stride_qn + offs_d * stride_qd,
                         mask=d_ok & has_q, other=0.0).to(tl.float32)
            tile_ok = key_ok[:, None] & d_ok[None, :]
            kt = tl.load(K + k_off + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=tile_ok, other=0.0).to(tl.float32)
            logit += tl.sum(kt * qd[None, :], axis=1)
            if WITH_V:
                vt = tl.load(V + v_off + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                             mask=tile_ok, other=0.0).to(tl.float32)
                vsq += tl.sum(vt * vt, axis=1)
        # the reference's matmul returns the input dtype
        logit = logit.to(dtype).to(tl.float32)
        if SCALE_IN_INPUT_DTYPE:
            logit = (logit * scale).to(dtype).to(tl.float32)
        else:
            logit = logit * scale
        if HAS_BIAS:
            b = tl.load(BIAS + bias_off + tok.to(tl.int64) * stride_bias_n, mask=key_ok, other=0.0)
            logit = logit + b.to(tl.float32)
            if ROUND_BIASED:  # logits + bias is in the input dtype when the bias' dtype is not wider
                logit = logit.to(dtype).to(tl.float32)
        logit = tl.where(key_ok, logit, float("-inf"))
        # softmax in fp32. A row without keys (an empty image) is NaN in the reference; here it is
        # 0 (no inf - inf): only masked-out tokens read it, so the results are the same
        mx = tl.max(logit, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(logit - mx)
        denom = tl.sum(e, axis=0)
        denom = tl.where(denom > 0.0, denom, 1.0)
        attn = tl.math.div_rn(e, tl.zeros_like(e) + denom)
        cls_sum += attn.to(dtype).to(tl.float32)  # cls_attention returns the input dtype
    return cls_sum, vsq


@triton.jit
def _count_points_le(x, POINTS, num_samples):
    """Number of sampling points ``p_i = (i + 0.5) / K`` with ``p_i <= x``, exactly.

    ``floor(x K + 0.5)`` is that count up to rounding (off by at most one when ``x`` is next to a
    point); comparing ``x`` with the two neighbouring points, read from the table the reference's
    own expression produced, makes it exact, so the counts agree with ``torch.searchsorted``.
    """
    kf = tl.zeros_like(x) + num_samples  # (an int argument of value 1 arrives as a constexpr)
    g = tl.floor(x * kf + 0.5)
    g = tl.minimum(tl.maximum(g, 0.0), kf).to(tl.int32)
    up = g < num_samples
    p_up = tl.load(POINTS + g, mask=up, other=0.0)
    g = tl.where(up & (p_up <= x), g + 1, g)
    down = g > 0
    p_down = tl.load(POINTS + g - 1, mask=down, other=0.0)
    g = tl.where(down & (p_down > x), g - 1, g)
    return g


@triton.jit
def _ats_scores_kernel(
    Q, K, V, VALID, CU, S,
    N, D, H, num_prefix, n_patch, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_valid_b, stride_valid_n,
    PACKED: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ATS scores of one image's patch tokens -> ``S[b, :n_patch]`` (fp32, sum 1; -1 marks invalid)."""
    b = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_N)
    if PACKED:
        # image b owns rows cu[b]:cu[b + 1] of the packed [1, H, T, D] buffers
        row0 = tl.load(CU + b).to(tl.int64)
        length = tl.load(CU + b + 1).to(tl.int64) - row0
        q_off = 0
        k_off = 0
        v_off = 0
        valid = tok < length
    else:
        row0 = 0
        length = N
        q_off = b * stride_qb
        k_off = b * stride_kb
        v_off = b * stride_vb
        valid = tok < N
        if HAS_VALID:
            valid &= tl.load(VALID + b * stride_valid_b + tok * stride_valid_n, mask=tok < N, other=0) != 0

    cls_sum, vsq = _cls_attention_sum(
        Q, K, V, Q, q_off, k_off, v_off, 0, row0, tok, valid, length > 0,
        D, H, scale,
        stride_qh, stride_qn, stride_qd,
        stride_kh, stride_kn, stride_kd,
        stride_vh, stride_vn, stride_vd,
        0,
        WITH_V=True, HAS_BIAS=False, SCALE_IN_INPUT_DTYPE=not PACKED, ROUND_BIASED=False,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )

    # significance scores of the patch tokens (ATS eq. 4-5), zero on padding, normalised to sum 1;
    # tl.where, not a product, so the NaN row of an image without valid keys cannot leak
    patch = (tok >= num_prefix) & (tok < num_prefix + n_patch)
    live = patch & valid
    s = tl.where(live, cls_sum * tl.sqrt(vsq), 0.0)
    total = tl.maximum(tl.sum(s, axis=0), 1.1754943508222875e-38)  # clamp_min(finfo.tiny)
    s = tl.math.div_rn(s, tl.zeros_like(s) + total)
    # scores are >= 0: -1 tells the sampling kernel which tokens are invalid
    tl.store(S + b * n_patch + (tok - num_prefix), tl.where(live, s, -1.0), mask=patch)


@triton.jit
def _sort_key(s, j, real):
    """int64 sort keys of patch tokens ``j`` with scores ``s`` (-1: invalid): ascending key = ascending
    score, ties by ascending index; invalid tokens below all valid ones; lanes not ``real`` last."""
    live = real & (s >= 0.0)
    # a non-negative float orders as its bit pattern (the & maps -0.0 to +0.0)
    bits = (s.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    j = j.to(tl.int64)
    return tl.where(live, (bits << 32) | j, tl.where(real, j - 4294967296, 0x7FFFFFFFFFFFFFFF)), live


@triton.jit
def _ats_sample_kernel(
    S, POINTS, CODE, COUNT, FLOOR,
    n_patch, num_samples, min_tokens,
    BLOCK_NP: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """ATS inverse-transform sampling of one image, in token order.

    Writes ``CODE[b, j]`` = 1 if token j is sampled (and valid) + 2 if it is among the ``min_tokens``
    best valid tokens, ``FLOOR[b]`` = whether the image sampled fewer than ``min_tokens`` (so the
    floor applies), and ``COUNT[b]``, its final kept count.
    """
    b = tl.program_id(0).to(tl.int64)
    s_img = S + b * n_patch
    # every token of the image along the columns
    jc = tl.arange(0, BLOCK_NP)
    sc = tl.load(s_img + jc, mask=jc < n_patch, other=-1.0)
    key_c, live_c = _sort_key(sc, jc, jc < n_patch)
    val_c = tl.where(live_c, sc, 0.0).to(tl.float64)

    count = tl.zeros([], dtype=tl.int32)      # sampled valid tokens
    n_top = tl.zeros([], dtype=tl.int32)      # valid tokens among the min_tokens best
    top_picked = tl.zeros([], dtype=tl.int32)  # ... that were sampled too
    for r0 in range(0, n_patch, BLOCK_J):
        jr = r0 + tl.arange(0, BLOCK_J)
        real_r = jr < n_patch
        sr = tl.load(s_img + jr, mask=real_r, other=-1.0)
        key_r, live_r = _sort_key(sr, jr, real_r)
        # a token's sorted position is the number of smaller keys (keys are unique); the CDF at that
        # position sums the scores of keys <= its own, the CDF one position earlier those < its own.
        # fp64 sums rounded to fp32 equal the reference's cumsum (fp64 accumulation on CPU) except
        # for sums within ~1e-16 of an fp32 rounding boundary.
        before = key_c[None, :] < key_r[:, None]
        upto = key_c[None, :] <= key_r[:, None]
        rank = tl.sum(before.to(tl.int32), axis=1)
        cdf_hi = tl.sum(tl.where(upto, val_c[None, :], 0.0), axis=1).to(tl.float32)
        cdf_lo = tl.sum(tl.where(before, val_c[None, :], 0.0), axis=1).to(tl.float32)
        # searchsorted(cdf, p) (left) gives point p the first position with cdf >= p, clamped to the
        # last: a position takes the points in (cdf[j - 1], cdf[j]], the last one all above
        # cdf[j - 1]. It is picked iff that interval holds a point: c(cdf[j]) > c(cdf[j - 1]).
        c_hi = _count_points_le(cdf_hi, POINTS, num_samples)
        c_hi = tl.where(rank == n_patch - 1, num_samples, c_hi)
        c_lo = _count_points_le(cdf_lo, POINTS, num_samples)
        sampled = live_r & (c_hi > c_lo)
        top = live_r & (rank >= n_patch - min_tokens)
        tl.store(CODE + b * n_patch + jr, (sampled.to(tl.int32) + 2 * top.to(tl.int32)).to(tl.uint8), mask=real_r)
        count += tl.sum(sampled.to(tl.int32), axis=0)
        n_top += tl.sum(top.to(tl.int32), axis=0)
        top_picked += tl.sum((sampled & top).to(tl.int32), axis=0)
    # the floor: an image that sampled fewer than min_tokens also keeps its min_tokens best tokens
    floor = count < min_tokens
    tl.store(COUNT + b, tl.where(floor, count + n_top - top_picked, count))
    tl.store(FLOOR + b, floor.to(tl.uint8))


@triton.jit
def _compact_kernel(
    CODE, COUNT, FLOOR, IDX, VALID_OUT,
    n_patch, num_prefix, width,
    BLOCK_NP: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """``reference._indices_of`` for one image: ``IDX[b]``/``VALID_OUT[b]`` of ``width = P + M`` entries."""
    b = tl.program_id(0).to(tl.int64)
    out_idx = IDX + b * width
    out_valid = VALID_OUT + b * width
    # prefix tokens, always kept, first
    p = tl.arange(0, BLOCK_P)
    tl.store(out_idx + p, p.to(tl.int64), mask=p < num_prefix)
    tl.store(out_valid + p, tl.full([BLOCK_P], 1, tl.uint8), mask=p < num_prefix)
    # kept patch tokens in original order: each goes to the slot its count of kept predecessors gives
    j = tl.arange(0, BLOCK_NP)
    code = tl.load(CODE + b * n_patch + j, mask=j < n_patch, other=0).to(tl.int32)
    floor = tl.load(FLOOR + b) != 0
    keep = ((code & 1) != 0) | (floor & ((code & 2) != 0))
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_idx + num_prefix + slot, (j + num_prefix).to(tl.int64), mask=keep)
    # valid flags of all patch slots, and index 0 on the padding slots
    count = tl.load(COUNT + b)
    m = width - num_prefix
    tl.store(out_valid + num_prefix + j, (j < count).to(tl.uint8), mask=j < m)
    tl.store(out_idx + num_prefix + j, tl.zeros([BLOCK_NP], dtype=tl.int64), mask=(j >= count) & (j < m))


@triton.jit
def _topk_select_kernel(
    Q, K, BIAS, IDX, W,
    N, D, H, num_prefix, keep, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_bias_b, stride_bias_n,
    HAS_BIAS: tl.constexpr, ROUND_BIASED: tl.constexpr, FUSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Top-``keep`` patch tokens of one image by head-averaged CLS attention -> ``IDX[b]`` (and ``W[b]``)."""
    b = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_N)
    tok_ok = tok < N
    cls_sum, _ = _cls_attention_sum(
        Q, K, K, BIAS, b * stride_qb, b * stride_kb, 0, b * stride_bias_b, 0, tok, tok_ok, N > 0,
        D, H, scale,
        stride_qh, stride_qn, stride_qd,
        stride_kh, stride_kn, stride_kd,
        0, 0, 0,
        stride_bias_n,
        WITH_V=False, HAS_BIAS=HAS_BIAS, SCALE_IN_INPUT_DTYPE=True, ROUND_BIASED=ROUND_BIASED,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    # cls.float().mean(dim=1): the sum over heads, then one division
    score = tl.math.div_rn(cls_sum, tl.zeros_like(cls_sum) + H)

    patch = (tok >= num_prefix) & tok_ok
    # a non-negative float orders as its bit pattern (NaN above all, as in torch.topk; the & maps
    # -0.0 to +0.0); lanes that are no patch token get -1, below every patch token
    bits = tl.where(patch, (score.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64), -1)
    # the keep-th largest score by bisection on its bits: the largest v with #(bits >= v) >= keep.
    # Invariants: #(bits >= lo) >= keep, and no v > hi qualifies; 31 halvings cover the bit range.
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.max(bits, axis=0)
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((bits >= mid).to(tl.int32), axis=0) >= keep
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    # all tokens above the threshold, and as many tokens equal to it as are still needed, lowest
    # index first
    above = bits > lo
    tie = bits == lo
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    need = keep - tl.sum(above.to(tl.int32), axis=0)
    kept = patch & (above | (tie & (tie_rank <= need))) & (keep > 0)

    out = IDX + b * (num_prefix + keep)
    p = tl.arange(0, BLOCK_P)
    tl.store(out + p, p.to(tl.int64), mask=p < num_prefix)
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(out + num_prefix + slot, tok.to(tl.int64), mask=kept)
    if FUSE:
        # EViT: dropped tokens weighted by their attention, not renormalised; stored in x's dtype,
        # the rounding the reference applies before its bmm
        w = tl.where(patch & ~kept, score, 0.0)
        tl.store(W + b * N + tok, w, mask=tok_ok)


@triton.jit
def _gather_fuse_kernel(
    X, IDX, W, OUT,
    N, C, M, n_row_blocks,
    stride_xb, stride_xn, stride_xc,
    stride_ob, stride_on, stride_oc,
    FUSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Rows ``IDX[b]`` of ``x`` into ``OUT[b, :M]``; with ``FUSE``, the program after the last row block
    writes ``OUT[b, M] = sum_n W[b, n] x[b, n]`` (fp32 accumulation)."""
    b = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    x_img = X + b * stride_xb
    if pid_r < n_row_blocks:
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < M
        src = tl.load(IDX + b * M + r, mask=r_ok, other=0)
        mask = r_ok[:, None] & col_ok[None, :]
        vals = tl.load(x_img + src[:, None] * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0)
        tl.store(OUT + b * stride_ob + r[:, None].to(tl.int64) * stride_on + cols[None, :] * stride_oc, vals, mask=mask)
    elif FUSE:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for t0 in range(0, N, BLOCK_R):
            t = t0 + tl.arange(0, BLOCK_R)
            t_ok = t < N
            w = tl.load(W + b * N + t, mask=t_ok, other=0.0).to(tl.float32)
            xt = tl.load(x_img + t[:, None].to(tl.int64) * stride_xn + cols[None, :] * stride_xc,
                         mask=t_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * xt, axis=0)
        tl.store(OUT + b * stride_ob + M * stride_on + cols * stride_oc, acc.to(OUT.dtype.element_ty), mask=col_ok)


# --- launchers -----------------------------------------------------------------------------------


def _check_qkv(names: tuple[str, ...], *ts: torch.Tensor) -> None:
    for name, t in zip(names, ts):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim], got {getattr(t, 'shape', type(t))}")
    q = ts[0]
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{names[0]} must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in zip(names[1:], ts[1:]):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have {names[0]}'s dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {names[0]}'s device {q.device}, got {t.device}")
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have {names[0]}'s shape {tuple(q.shape)}, got {tuple(t.shape)}")


def _check_counts(num_prefix: int, num_samples: int, min_tokens: int) -> None:
    for name, val in (("num_prefix", num_prefix), ("num_samples", num_samples), ("min_tokens", min_tokens)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")


def _tile_elems(device: torch.device) -> int:
    return _TILE_ELEMS.get(device.type, _TILE_ELEMS["cuda"])


def _token_blocks(n_tok: int, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): all tokens of an image in one block, the head dim tiled to fit."""
    if n_tok > _MAX_TOKENS:
        raise ValueError(f"at most {_MAX_TOKENS} tokens per image are supported, got {n_tok}")
    block_n = max(16, triton.next_power_of_2(n_tok))
    block_d = min(triton.next_power_of_2(max(head_dim, 1)), max(1, _tile_elems(device) // block_n))
    return block_n, block_d


def _num_warps(block_n: int) -> int:
    return 4 if block_n <= 512 else 8


@functools.lru_cache(maxsize=64)
def _points(num_samples: int, device: torch.device) -> torch.Tensor:
    """The reference's sampling points ``(arange(K) + 0.5) / K`` (fp32), by the same PyTorch ops on the
    same device, so that they are bit-identical (CUDA divides by a scalar through its reciprocal)."""
    pts = (torch.arange(num_samples, device=device, dtype=torch.float32) + 0.5) / num_samples
    # a 1-element placeholder when K = 0: the kernel reads nothing then, but needs a pointer
    return pts if num_samples > 0 else torch.zeros(1, device=device, dtype=torch.float32)


def _select_and_compact(
    q, k, v, valid, cu, n_images, n_tok, scale, num_prefix, num_samples, min_tokens, packed
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the ATS kernels for ``n_images`` images of ``n_tok`` token slots each."""
    device = q.device
    n_patch = max(n_tok - num_prefix, 0)
    scores = torch.empty(n_images, n_patch, dtype=torch.float32, device=device)
    if n_patch > 0:
        dummy = torch.empty(1, dtype=torch.int32, device=device)  # pointer for unused arguments
        h, d = q.shape[1], q.shape[3]
        block_n, block_d = _token_blocks(n_tok, d, device)
        _ats_scores_kernel[(n_images,)](
            q, k, v, valid if valid is not None else dummy, cu if cu is not None else dummy, scores,
            n_tok, d, h, num_prefix, n_patch, float(scale),
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            valid.stride(0) if valid is not None else 0, valid.stride(1) if valid is not None else 0,
            PACKED=packed, HAS_VALID=valid is not None,
            BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=_num_warps(block_n),
        )
    return _sample_and_compact(scores, num_prefix, num_samples, min_tokens)


def _sample_and_compact(
    scores: torch.Tensor, num_prefix: int, num_samples: int, min_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling and compaction launches on scores ``[B, Np]`` (fp32, contiguous, -1 on invalid tokens)."""
    device = scores.device
    n_images, n_patch = scores.shape
    count = torch.zeros(n_images, dtype=torch.int32, device=device)
    floor = torch.zeros(n_images, dtype=torch.uint8, device=device)
    code = torch.empty(n_images, n_patch, dtype=torch.uint8, device=device)
    if n_patch > 0 and n_images > 0:
        block_np = max(16, triton.next_power_of_2(n_patch))
        _ats_sample_kernel[(n_images,)](
            scores, _points(num_samples, device), code, count, floor,
            n_patch, num_samples, min_tokens,
            BLOCK_NP=block_np, BLOCK_J=max(16, min(block_np, _tile_elems(device) // block_np)),
            num_warps=_num_warps(block_np),
        )
    # the output width is data-dependent: one sync (the reference's int(counts.max()))
    m = int(count.max()) if n_patch > 0 and n_images > 0 else 0
    width = num_prefix + m
    idx = torch.empty(n_images, width, dtype=torch.int64, device=device)
    valid_out = torch.empty(n_images, width, dtype=torch.uint8, device=device)
    if width > 0 and n_images > 0:
        _compact_kernel[(n_images,)](
            code, count, floor, idx, valid_out, n_patch, num_prefix, width,
            BLOCK_NP=max(16, triton.next_power_of_2(max(n_patch, 1))),
            BLOCK_P=max(16, triton.next_power_of_2(max(num_prefix, 1))),
        )
    return idx, valid_out.view(torch.bool)


def _ats_select_from_scores(
    scores: torch.Tensor, num_samples: int, min_tokens: int, num_prefix: int, valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.ats_select`` by the sampling and compaction kernels (for tests of that stage alone).

    Args:
        scores: ``[B, Np]`` non-negative fp32 scores; valid: ``[B, P + Np]`` bool or None.
    """
    if scores.dtype != torch.float32 or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D float32 tensor, got {scores.dtype} {tuple(scores.shape)}")
    if valid is not None:
        scores = torch.where(valid[:, num_prefix:], scores, -1.0)
    return _sample_and_compact(scores.contiguous(), num_prefix, num_samples, min_tokens)


def ats_select_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    num_prefix: int,
    num_samples: int,
    min_tokens: int,
    valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATS token selection from the attention inputs of a dense (padded) batch.

    Equals ``ats_select(ats_scores(cls_attention(q, k, scale, bias), v, num_prefix, valid),
    num_samples, min_tokens, num_prefix, valid)`` with ``bias = valid_to_bias(valid)`` (None without
    ``valid``).

    Args:
        q, k, v: ``[B, H, N, D]`` (any strides), float16/bfloat16/float32; token 0 is the CLS token.
        scale: softmax scale of the logits.
        num_prefix: prefix tokens (never dropped, listed first).
        num_samples: K, the most patch tokens an image keeps.
        min_tokens: floor on kept patch tokens (capped by an image's valid tokens).
        valid: optional ``[B, N]`` bool, False on padding tokens (masked as keys, never kept).

    Returns:
        ``(idx, valid)``, both ``[B, P + M]`` (int64, bool) with ``M`` the batch's largest kept count:
        prefix indices first, then the kept patch tokens in original order, padded with index 0 and
        ``valid=False``.
    """
    _check_qkv(("q", "k", "v"), q, k, v)
    _check_counts(num_prefix, num_samples, min_tokens)
    b, h, n, d = q.shape
    if num_prefix > n:
        raise ValueError(f"num_prefix={num_prefix} exceeds the {n} tokens of q")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (b, n):
            raise ValueError(f"valid must be a bool tensor of shape {(b, n)}, got "
                             f"{getattr(valid, 'dtype', type(valid))} {tuple(getattr(valid, 'shape', ()))}")
        if valid.device != q.device:
            raise ValueError(f"valid must be on q's device {q.device}, got {valid.device}")
        valid = valid.view(torch.uint8)  # the kernel reads the flags as bytes
    if b == 0 or n == 0:
        # no images (or no tokens): the reference's shapes, nothing to launch
        idx = torch.arange(num_prefix, device=q.device).expand(b, num_prefix).contiguous()
        return idx, torch.ones(b, num_prefix, dtype=torch.bool, device=q.device)
    return _select_and_compact(q, k, v, valid, None, b, n, scale, num_prefix, num_samples, min_tokens, packed=False)


def ats_select_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
    num_prefix: int,
    num_samples: int,
    min_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATS token selection from packed attention inputs, without unpacking them.

    Equals ``ats_select(ats_scores_from_norms(cls, vnorm, num_prefix, valid), num_samples, min_tokens,
    num_prefix, valid)`` with ``cls, vnorm, valid = packed_cls_scores(q, k, v, cu, scale)``: tokens
    are indexed within their image, padded to the longest image ``L``.

    Args:
        q, k, v: packed ``[1, H, T, D]`` (any strides); image ``i`` owns rows ``cu[i]:cu[i + 1]``,
            its CLS token first.
        cu: ``[B + 1]`` int64 (or int32) non-decreasing offsets within ``[0, T]``.
        scale, num_prefix, num_samples, min_tokens: as for :func:`ats_select_dense`.

    Returns:
        ``(idx, valid)``, both ``[B, P + M]`` (int64, bool), as :func:`ats_select_dense`.
    """
    _check_qkv(("q", "k", "v"), q, k, v)
    _check_counts(num_prefix, num_samples, min_tokens)
    if q.shape[0] != 1:
        raise ValueError(f"packed q/k/v must be [1, H, T, D], got {tuple(q.shape)}")
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu must be a 1-D tensor of B + 1 offsets, got {getattr(cu, 'shape', type(cu))}")
    if cu.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cu must be int64 (or int32), got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"cu must be on q's device {q.device}, got {cu.device}")
    t = q.shape[2]
    b = cu.numel() - 1
    if b == 0:
        empty = torch.empty(0, num_prefix, device=q.device)
        return empty.long(), empty.bool()
    # the block size needs the longest image; the same sync checks the offsets
    lengths = cu[1:] - cu[:-1]
    longest, shortest, first, last = torch.stack([lengths.max(), lengths.min(), cu[0], cu[-1]]).tolist()
    if shortest < 0 or first < 0 or last > t:
        raise ValueError(f"cu must be non-decreasing offsets within [0, {t}], got {cu.tolist()}")
    cu = cu.contiguous()
    return _select_and_compact(q, k, v, None, cu, b, longest, scale, num_prefix, num_samples, min_tokens, packed=True)


def topk_gather(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    keep: int,
    num_prefix: int,
    fuse: bool,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """EViT / top-k token selection and gather in two launches.

    Equals ``gather_tokens(x, topk_select(cls, keep, num_prefix), 1)`` with
    ``cls = cls_attention(q, k, scale, bias)``, followed (when ``fuse`` and tokens are dropped) by
    ``evit_fuse(x, cls, idx, num_prefix)`` as one extra token.

    Args:
        x: residual stream ``[B, N, C]`` (any strides), float16/bfloat16/float32.
        q, k: ``[B, H, N, D]`` (any strides), one float dtype; token 0 is the CLS token.
        scale: softmax scale of the logits.
        keep: patch tokens kept, ``0 <= keep <= N - num_prefix``.
        num_prefix: prefix tokens, always kept, first.
        fuse: append EViT's fused token (the dropped tokens summed with their attention as weights).
        bias: optional additive attention bias ``[B, 1, 1, N]`` (broadcast over a batch of 1 allowed).

    Returns:
        ``[B, P + keep (+ 1), C]`` in x's dtype: prefix tokens, kept tokens in original order, then the
        fused token if ``fuse and keep < N - num_prefix``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a 3-D tensor [batch, tokens, channels], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check_qkv(("q", "k"), q, k)
    if q.device != x.device:
        raise ValueError(f"q and k must be on x's device {x.device}, got {q.device}")
    b, n, c = x.shape
    if q.shape[0] != b or q.shape[2] != n:
        raise ValueError(f"q/k must be [B, H, N, D] with x's B={b}, N={n}, got {tuple(q.shape)}")
    for name, val in (("num_prefix", num_prefix), ("keep", keep)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if num_prefix > n or keep > n - num_prefix:
        raise ValueError(f"keep={keep} patch tokens plus num_prefix={num_prefix} exceed the {n} tokens of x")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 4 or bias.shape[1:3] != (1, 1) \
                or bias.shape[3] != n or bias.shape[0] not in (1, b):
            raise ValueError(f"bias must be [B, 1, 1, N] = [{b}, 1, 1, {n}], got {getattr(bias, 'shape', type(bias))}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
    fuse = bool(fuse) and keep < n - num_prefix
    m = num_prefix + keep
    out = torch.empty(b, m + int(fuse), c, dtype=x.dtype, device=x.device)
    if b == 0 or out.shape[1] == 0:
        return out
    h, d = q.shape[1], q.shape[3]
    block_n, block_d = _token_blocks(n, d, x.device)
    idx = torch.empty(b, m, dtype=torch.int64, device=x.device)
    # weights in x's dtype: the reference rounds them to it before its bmm
    w = torch.empty(b, n, dtype=x.dtype, device=x.device) if fuse else idx
    # logits (q's dtype) + bias: the sum is rounded to q's dtype unless the bias' dtype is wider
    round_biased = bias is not None and torch.promote_types(q.dtype, bias.dtype) == q.dtype
    _topk_select_kernel[(b,)](
        q, k, bias if bias is not None else q, idx, w,
        n, d, h, num_prefix, keep, float(scale),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        (bias.stride(0) if bias.shape[0] > 1 else 0) if bias is not None else 0,
        bias.stride(3) if bias is not None else 0,
        HAS_BIAS=bias is not None, ROUND_BIASED=round_biased, FUSE=fuse,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_P=max(16, triton.next_power_of_2(max(num_prefix, 1))),
        num_warps=_num_warps(block_n),
    )
    if c == 0:
        return out
    block_c = min(triton.next_power_of_2(c), 512)
    block_r = max(1, min(64, 8192 // block_c))
    n_row_blocks = triton.cdiv(m, block_r)
    grid = (b, n_row_blocks + int(fuse), triton.cdiv(c, block_c))
    _gather_fuse_kernel[grid](
        x, idx, w, out,
        n, c, m, n_row_blocks,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        FUSE=fuse, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out
