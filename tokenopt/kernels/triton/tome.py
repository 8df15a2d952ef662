"""ToMe bipartite matching and size-weighted merge, fused into three Triton kernels.

:func:`tome_merge_fused` equals the reference chain

.. code-block:: python

    metric = k.mean(dim=1)
    unm, src, dst = reference.tome_match(metric, r, num_prefix)
    x_new, size_new = reference.tome_merge(x, size, unm, src, dst, num_prefix)

without materialising the metric, the ``[B, |A|, |B|]`` score matrix or the ``x * size`` copy:

1. ``_tome_scores_kernel``, one program per (image, block of A tokens): averages the keys over heads,
   normalises the rows, scores them against all B tokens with ``tl.dot`` tile by tile and keeps each A
   row's best score and its B partner (``node_max``, ``node_idx``).
2. ``_tome_rank_kernel``, one program per image: ranks the A tokens by ``node_max`` (each token's
   rank is the number of smaller int64 keys, a key holding the score's bits and the token index, so
   ranks are unique and ties keep index order), emits ``unm_idx`` / ``src_idx`` / ``dst_idx``, and
   groups the merged A tokens by their B partner (a CSR table: for every B token the first entry and
   count of its sources in a src list sorted by destination, also built by counting).
3. ``_tome_merge_kernel``, one program per (image, block of output tokens, block of channels): prefix
   and unmerged A tokens are copies; each B token adds ``x * size`` of the A tokens merged into it
   (read through the CSR table, so no atomics: the result is deterministic) and divides by the summed
   size.

Token sets follow :func:`tokenopt.kernels.reference.tome_match`: the patch tokens (after the
``num_prefix`` prefix tokens) alternate into A (even) and B (odd); prefix tokens are never merged;
``r`` is capped at ``|A|``; the output order is ``[prefix, unmerged A ascending, B]``.

Launchers take CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported. Inputs may be non-contiguous (``k`` is typically a permuted view of a fused qkv projection):
every kernel reads through strides.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["tome_match_fused", "tome_merge_fused"]


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _load_metric_rows(
    k_ptr, tok, mask_rows, offs_d, mask_d,
    stride_kh, stride_kn, stride_kd,
    H: tl.constexpr,
):
    """Unit-norm ToMe metric of the tokens ``tok`` (``[BLOCK, BLOCK_D]`` fp32): keys averaged over heads."""
    mask = mask_rows[:, None] & mask_d[None, :]
    acc = tl.zeros([tok.shape[0], offs_d.shape[0]], dtype=tl.float32)
    for h in range(H):
        ptrs = k_ptr + h * stride_kh + tok[:, None] * stride_kn + offs_d[None, :] * stride_kd
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    # the reference's metric is ``k.mean(dim=1)`` in k's dtype: round it the same way so fp16 keys
    # give the same (rounded) metric, hence the same matching, as the reference
    m = (acc / H).to(k_ptr.dtype.element_ty).to(tl.float32)
    norm = tl.sqrt(tl.sum(m * m, axis=1))
    norm = tl.maximum(norm, 1e-12)  # the reference's clamp_min(1e-12): a zero row stays zero
    return m / norm[:, None]


@triton.jit
def _tome_scores_kernel(
    k_ptr, node_max_ptr, node_idx_ptr,
    NA, NB, D, num_prefix,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Best cosine score of each A token over all B tokens and its B index (ties: smallest index)."""
    pid_b = tl.program_id(0).to(tl.int64)  # int64: batch offsets of large tensors overflow int32
    pid_a = tl.program_id(1)
    k_img = k_ptr + pid_b * stride_kb

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    a = _load_metric_rows(k_img, num_prefix + 2 * offs_a, mask_a, offs_d, mask_d,
                          stride_kh, stride_kn, stride_kd, H)

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_A], dtype=tl.int64)
    for start in range(0, NB, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        b = _load_metric_rows(k_img, num_prefix + 2 * offs_b + 1, mask_b, offs_d, mask_d,
                              stride_kh, stride_kn, stride_kd, H)
        # ieee: TF32 (the GPU default for fp32 dots) would perturb scores by ~1e-3 and change matches
        s = tl.dot(a, tl.trans(b), input_precision="ieee")
        s = tl.where(mask_b[None, :], s, float("-inf"))
        tile_max = tl.max(s, axis=1)
        # smallest B index among the tile's maxima, as torch.max returns the first maximum
        tile_idx = tl.min(tl.where(s == tile_max[:, None], offs_b[None, :], 2147483647), axis=1)
        # strictly greater: on a tie the earlier tile (smaller index) keeps the match
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)

    tl.store(node_max_ptr + pid_b * NA + offs_a, best, mask=mask_a)
    tl.store(node_idx_ptr + pid_b * NA + offs_a, best_idx, mask=mask_a)


@triton.jit
def _rank_key(node_max_ptr, offs, valid):
    """int64 sort keys of A tokens ``offs``: ascending key = descending score, ties by ascending index."""
    score = tl.load(node_max_ptr + offs, mask=valid, other=0.0)
    # -0.0 and +0.0 tie in torch's sort: give them one bit pattern
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    # floats -> int32 with the same order (negative floats count down: flip their magnitude bits),
    # then ~ for descending order (no overflow, unlike negation)
    desc = ~(bits ^ ((bits >> 31) & 0x7FFFFFFF))
    # high half: descending score; low half: token index, so equal scores keep ascending index
    # order, as the reference's stable descending argsort; padding lanes sort last
    key = (desc.to(tl.int64) << 32) | offs.to(tl.int64)
    return tl.where(valid, key, 0x7FFFFFFFFFFFFFFF)


@triton.jit
def _tome_rank_kernel(
    node_max_ptr, node_idx_ptr,
    unm_ptr, src_ptr, dst_ptr, src_by_dst_ptr, seg_first_ptr, seg_count_ptr,
    NA, NB, r, R_STRIDE, U_STRIDE,
    BLOCK_NA: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Rank one image's A tokens by best score; emit unm/src/dst and the per-B-token source table."""
    pid_b = tl.program_id(0).to(tl.int64)
    BIG: tl.constexpr = 0x7FFFFFFFFFFFFFFF  # above every real key
    node_max_img = node_max_ptr + pid_b * NA
    node_idx_img = node_idx_ptr + pid_b * NA

    offs = tl.arange(0, BLOCK_NA)
    valid = offs < NA
    key = _rank_key(node_max_img, offs, valid)

    # a token's rank is the number of smaller keys (keys are unique). Counting in [BLOCK_J, BLOCK_NA]
    # tiles costs O(|A|^2) compares, below the O(|A| |B| D) of the scores, and needs no bitonic
    # network (tl.sort), which Triton's CPU interpreter runs about 10x slower
    thr = tl.zeros([], dtype=tl.int64) + BIG  # key of the token ranked r (none if r == |A|)
    for c0 in range(0, NA, BLOCK_J):
        offs_c = c0 + tl.arange(0, BLOCK_J)
        valid_c = offs_c < NA
        key_c = _rank_key(node_max_img, offs_c, valid_c)
        rank_c = tl.sum((key[None, :] < key_c[:, None]).to(tl.int32), axis=1)
        # src/dst in rank order (best match first), as the reference's argsort gives them
        is_src_c = valid_c & (rank_c < r)
        tl.store(src_ptr + pid_b * R_STRIDE + rank_c, offs_c.to(tl.int64), mask=is_src_c)
        dst_c = tl.load(node_idx_img + offs_c, mask=is_src_c, other=0)
        tl.store(dst_ptr + pid_b * R_STRIDE + rank_c, dst_c, mask=is_src_c)
        thr = tl.minimum(thr, tl.min(tl.where(valid_c & (rank_c == r), key_c, BIG)))

    # the merged tokens are exactly those with a key below the one ranked r
    merged = key < thr  # in token order
    keep = valid & (key >= thr)
    # unmerged tokens, ascending: each goes to the slot its count of kept predecessors gives
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(unm_ptr + pid_b * U_STRIDE + slot, offs.to(tl.int64), mask=keep)

    # merged tokens grouped by destination, ascending within a group, so the merge kernel sums each B
    # token's sources itself (deterministic, no atomics): a token's slot is the number of merged
    # tokens with a smaller (destination, index) pair, counted as the ranks were
    dst_t = tl.load(node_idx_img + offs, mask=merged, other=NB)  # NB: a destination no B token has
    group = tl.where(merged, dst_t * NA + offs, BIG)
    for c0 in range(0, NA, BLOCK_J):
        offs_c = c0 + tl.arange(0, BLOCK_J)
        merged_c = _rank_key(node_max_img, offs_c, offs_c < NA) < thr
        dst_c = tl.load(node_idx_img + offs_c, mask=merged_c, other=0)
        group_c = tl.where(merged_c, dst_c * NA + offs_c, BIG)
        slot_c = tl.sum((group[None, :] < group_c[:, None]).to(tl.int32), axis=1)
        tl.store(src_by_dst_ptr + pid_b * R_STRIDE + slot_c, offs_c.to(tl.int64), mask=merged_c)
    # per B token: where its sources start in that list and how many there are
    for j0 in range(0, NB, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        first = tl.sum((dst_t[None, :] < offs_j[:, None]).to(tl.int32), axis=1)
        count = tl.sum((dst_t[None, :] == offs_j[:, None]).to(tl.int32), axis=1)
        tl.store(seg_first_ptr + pid_b * NB + offs_j, first, mask=offs_j < NB)
        tl.store(seg_count_ptr + pid_b * NB + offs_j, count, mask=offs_j < NB)


@triton.jit
def _tome_merge_kernel(
    x_ptr, size_ptr, unm_ptr, src_by_dst_ptr, seg_first_ptr, seg_count_ptr,
    out_ptr, out_size_ptr,
    N_OUT, C, NA, NB, r, R_STRIDE, U_STRIDE, num_prefix,
    stride_xb, stride_xn, stride_xc,
    stride_sb, stride_sn,
    stride_ob, stride_on, stride_osb, stride_osn,
    HAS_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Output tokens ``[prefix, unmerged A, B]``: copies, and size-weighted means for the B tokens."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    pid_c = tl.program_id(2)
    x_img = x_ptr + pid_b * stride_xb
    size_img = size_ptr + pid_b * stride_sb

    o = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_o = o < N_OUT
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    n_unm = NA - r
    is_unm = (o >= num_prefix) & (o < num_prefix + n_unm)
    is_b = mask_o & (o >= num_prefix + n_unm)
    j = o - num_prefix - n_unm  # index within B of a B row

    # the input token each output row starts from
    ua = tl.load(unm_ptr + pid_b * U_STRIDE + (o - num_prefix), mask=is_unm, other=0)
    tok = tl.where(o < num_prefix, o, tl.where(is_unm, num_prefix + 2 * ua, num_prefix + 2 * j + 1))
    first = tl.load(seg_first_ptr + pid_b * NB + j, mask=is_b, other=0)
    count = tl.load(seg_count_ptr + pid_b * NB + j, mask=is_b, other=0)

    mask = mask_o[:, None] & mask_c[None, :]
    x = tl.load(x_img + tok[:, None] * stride_xn + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_SIZE:
        s = tl.load(size_img + tok * stride_sn, mask=mask_o, other=1.0).to(tl.float32)
    else:
        s = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    acc = x * s[:, None]
    s_sum = s
    # at most as many rounds as the largest group of sources in this tile (usually 0 to 2)
    for i in range(tl.max(count)):
        take = i < count
        a = tl.load(src_by_dst_ptr + pid_b * R_STRIDE + first + i, mask=take, other=0)
        ta = num_prefix + 2 * a
        xa = tl.load(x_img + ta[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                     mask=take[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if HAS_SIZE:
            sa = tl.load(size_img + ta * stride_sn, mask=take, other=0.0).to(tl.float32)
        else:
            sa = tl.where(take, 1.0, 0.0)
        acc += xa * sa[:, None]
        s_sum += sa
    # tokens nothing was merged into are copied: x * s / s would only add rounding
    out = tl.where((count > 0)[:, None], acc / s_sum[:, None], x)
    tl.store(out_ptr + pid_b * stride_ob + o[:, None] * stride_on + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    if pid_c == 0:
        tl.store(out_size_ptr + pid_b * stride_osb + o * stride_osn,
                 s_sum.to(out_size_ptr.dtype.element_ty), mask=mask_o)


# --- launchers -----------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_keys(k: torch.Tensor, r: int, num_prefix: int, n: Optional[int] = None, batch: Optional[int] = None) -> None:
    """Shared input checks of the two launchers (clear errors rather than wrong indices)."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, H, N, D] tensor, got shape {tuple(getattr(k, 'shape', ()))}")
    if k.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"k must be float16, bfloat16 or float32, got {k.dtype}")
    if batch is not None and k.shape[0] != batch:
        raise ValueError(f"k has batch {k.shape[0]} but x has batch {batch}")
    if n is not None and k.shape[2] != n:
        raise ValueError(f"k has {k.shape[2]} tokens (dim 2) but x has {n} (dim 1)")
    if int(r) != r or r < 0:
        raise ValueError(f"r must be a non-negative integer, got {r}")
    n = k.shape[2]
    if int(num_prefix) != num_prefix or not 0 <= num_prefix <= n:
        raise ValueError(f"num_prefix must be an integer in [0, {n}], got {num_prefix}")
    if n - num_prefix < 2:
        # the reference fails here too (max over an empty B set)
        raise ValueError(
            f"ToMe matching needs at least 2 patch tokens (one in A, one in B), got N={n} with num_prefix={num_prefix}"
        )
    if k.shape[1] < 1 or k.shape[3] < 1:
        raise ValueError(f"k needs at least one head and one channel, got shape {tuple(k.shape)}")


def _match(k: torch.Tensor, r: int, num_prefix: int):
    """Run kernels 1 and 2: ``(unm, src, dst, src_by_dst, seg_first, seg_count)`` (indices within A/B)."""
    bsz, h, n, d = k.shape
    n_patch = n - num_prefix
    na, nb = (n_patch + 1) // 2, n_patch // 2
    r = min(int(r), na)
    dev = k.device
    # index rows are at least 1 wide so no kernel ever gets a pointer to an empty buffer
    r_stride, u_stride = max(r, 1), max(na - r, 1)
    unm = torch.empty(bsz, u_stride, dtype=torch.int64, device=dev)
    src = torch.empty(bsz, r_stride, dtype=torch.int64, device=dev)
    dst = torch.empty(bsz, r_stride, dtype=torch.int64, device=dev)
    src_by_dst = torch.empty(bsz, r_stride, dtype=torch.int64, device=dev)
    seg_first = torch.empty(bsz, nb, dtype=torch.int32, device=dev)
    seg_count = torch.empty(bsz, nb, dtype=torch.int32, device=dev)
    if bsz == 0:
        return unm[:, : na - r], src[:, :r], dst[:, :r], src_by_dst, seg_first, seg_count

    node_max = torch.empty(bsz, na, dtype=torch.float32, device=dev)
    node_idx = torch.empty(bsz, na, dtype=torch.int64, device=dev)
    # tl.dot needs every tile side >= 16. 32 x 32 score tiles with 8 warps: the fp32 (ieee) dot runs
    # on FMA units and larger tiles spill registers (ptxas, sm_80, D = 64)
    block_d = max(16, triton.next_power_of_2(d))
    block_a = max(16, min(32, triton.next_power_of_2(na)))
    block_b = max(16, min(32, triton.next_power_of_2(nb)))
    _tome_scores_kernel[(bsz, triton.cdiv(na, block_a))](
        k, node_max, node_idx,
        na, nb, d, num_prefix,
        *k.stride(),
        H=h, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=8,
    )
    # one program ranks an image's whole A set: its keys stay in registers
    block_na = max(16, triton.next_power_of_2(na))
    block_j = max(16, min(64, 4096 // block_na))  # the [BLOCK_J, BLOCK_NA] compare tile stays small
    _tome_rank_kernel[(bsz,)](
        node_max, node_idx,
        unm, src, dst, src_by_dst, seg_first, seg_count,
        na, nb, r, r_stride, u_stride,
        BLOCK_NA=block_na, BLOCK_J=block_j,
    )
    return unm[:, : na - r], src[:, :r], dst[:, :r], src_by_dst, seg_first, seg_count


def tome_match_fused(k: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite matching from a block's keys: ``reference.tome_match(k.mean(dim=1), r, num_prefix)``.

    Args:
        k: keys ``[B, H, N, D]`` (any strides); the metric is their mean over the heads.
        r: how many A tokens to merge; capped at ``|A| = ceil((N - num_prefix) / 2)``.
        num_prefix: leading tokens that take no part in the matching.

    Returns:
        ``unm_idx [B, |A| - r]`` (kept A tokens, ascending), ``src_idx [B, r]`` (merged A tokens, best
        match first) and ``dst_idx [B, r]`` (their B partners), int64 indices within A or B.
    """
    _check_keys(k, r, num_prefix)
    unm, src, dst, *_ = _match(k, r, num_prefix)
    return unm, src, dst


def tome_merge_fused(
    x: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], r: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe matching and size-weighted merge in three kernel launches.

    Equals ``reference.tome_merge(x, size, *reference.tome_match(k.mean(dim=1), r, num_prefix),
    num_prefix)``: output tokens ``[prefix, unmerged A (ascending), B]``, each B token the
    size-weighted mean of itself and the A tokens merged into it, sizes added.

    Args:
        x: residual stream ``[B, N, C]`` (any strides).
        k: the block's keys ``[B, H, N, D]`` (any strides, e.g. a permuted view of a fused qkv).
        size: token sizes ``[B, N, 1]``, or None for all ones.
        r: how many tokens to merge away; capped at ``|A| = ceil((N - num_prefix) / 2)``.
        num_prefix: leading tokens (CLS, registers) that are never merged.

    Returns:
        ``x_new [B, N - r, C]`` and ``size_new [B, N - r, 1]`` (``r`` capped), in the dtype the
        reference gives (``x``'s, promoted with ``size``'s when a size is given).
    """
    x_new, size_new, _ = _merge_and_match(x, k, size, r, num_prefix)
    return x_new, size_new


def _merge_and_match(
    x: torch.Tensor, k: torch.Tensor, size: Optional[torch.Tensor], r: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`tome_merge_fused` that also returns the match ``(unm_idx, src_idx, dst_idx)`` it used
    (the tests check both from one run: the interpreter is slow)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, N, C] tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    bsz, n, c = x.shape
    _check_keys(k, r, num_prefix, n=n, batch=bsz)
    out_dtype = x.dtype
    if size is not None:
        if size.dim() != 3 or tuple(size.shape) != (bsz, n, 1):
            raise ValueError(f"size must be [B, N, 1] = {(bsz, n, 1)}, got {tuple(size.shape)}")
        if size.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"size must be float16, bfloat16 or float32, got {size.dtype}")
        # the reference concatenates x * size with size: the result takes the promoted dtype
        out_dtype = torch.promote_types(x.dtype, size.dtype)
    for name, t in (("k", k), ("size", size)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    n_patch = n - num_prefix
    na, nb = (n_patch + 1) // 2, n_patch // 2
    r = min(int(r), na)
    n_out = n - r
    out = torch.empty(bsz, n_out, c, dtype=out_dtype, device=x.device)
    out_size = torch.empty(bsz, n_out, 1, dtype=out_dtype, device=x.device)
    unm, src, dst, src_by_dst, seg_first, seg_count = _match(k, r, num_prefix)
    if bsz == 0:
        return out, out_size, (unm, src, dst)

    # 16 x 256 tiles with 8 warps compile without register spills (ptxas, sm_80)
    block_t = 16
    block_c = min(256, triton.next_power_of_2(max(c, 1)))
    size_arg = size if size is not None else x  # never read when HAS_SIZE is False
    stride_sb, stride_sn = (size.stride(0), size.stride(1)) if size is not None else (0, 0)
    # at least one channel block, so the sizes are written even when C == 0
    grid = (bsz, triton.cdiv(n_out, block_t), max(1, triton.cdiv(c, block_c)))
    _tome_merge_kernel[grid](
        x, size_arg, unm, src_by_dst, seg_first, seg_count,
        out, out_size,
        n_out, c, na, nb, r, src_by_dst.stride(0), unm.stride(0), num_prefix,
        *x.stride(),
        stride_sb, stride_sn,
        out.stride(0), out.stride(1), out_size.stride(0), out_size.stride(1),
        HAS_SIZE=size is not None,
        BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=8,
    )
    return out, out_size, (unm, src, dst)
