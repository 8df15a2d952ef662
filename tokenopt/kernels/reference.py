"""Token ops in plain PyTorch: the specification every graph rewrite and every kernel is held to.

Nothing here knows about graphs or models: tensors in, tensors out. Shape convention:

* ``x``: residual stream ``[B, N, C]``; the first ``num_prefix`` tokens (CLS, distillation,
  registers) are never dropped or merged; token 0 is the CLS token where a policy needs one.
* ``q, k, v``: attention inputs ``[B, H, N, D]``.
* ``bias``: additive attention bias over keys, ``[B, 1, 1, N]`` (``-inf`` masks a key), or ``None``.
* ``idx``: kept-token indices ``[B, M]`` into the token axis, prefix tokens first, then patch tokens
  in their original order. ``valid``: ``[B, M]`` bool, False on padding (ATS pads every image of a
  batch to the batch's largest kept count).
* ``size``: ToMe token sizes ``[B, N, 1]`` (how many original patches a token stands for).

Sources: ATS (Fayyaz et al., ECCV 2022), EViT (Liang et al., ICLR 2022), ToMe (Bolya et al., ICLR
2023); the facts used are listed in the docs of each function.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "cls_attention",
    "ats_scores",
    "ats_select",
    "topk_select",
    "evit_fuse",
    "gather_tokens",
    "valid_to_bias",
    "tome_match",
    "tome_merge",
    "size_to_bias",
    "masked_mean",
    "sized_mean",
    "packed_index",
    "gather_packed",
    "unpack_padded",
    "packed_first",
    "packed_cls_scores",
    "ats_scores_from_norms",
    "packed_mean",
    "varlen_attention",
    "scatter_keep",
    # the sync-free forms the realisation pass uses (tokenopt/kernels/ops.py wraps each as an op)
    "token_bias", "value_norms", "pad_indices", "gather_valid", "tome_slots", "merge_tokens", "slots_valid",
    "pack_index", "unpack", "repack", "packed_cls_attention", "varlen_attention_padded", "packed_select",
    "packed_weighted_mean", "weighted_mean", "token_positions", "side_gather", "pair_gather", "slot_positions",
    "tome_representatives",
]


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision is upcast for softmax and norms; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention row of the CLS query (token 0) over all keys: ``[B, H, N]``.

    This is row 0 of ``softmax(q k^T * scale + bias)``, computed as ``q_cls . K^T`` so the full
    attention can stay inside a fused SDPA kernel.
    """
    logits = torch.matmul(q[:, :, :1], k.transpose(-2, -1)) * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return torch.softmax(_up(logits), dim=-1).squeeze(2).to(q.dtype)


def ats_scores(
    cls_attn: torch.Tensor, v: torch.Tensor, num_prefix: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ATS significance scores of the patch tokens, ``[B, N - num_prefix]``, summing to 1 per image.

    ``s_j = (sum_h A[cls, j]) * ||v_j||`` with ``||v_j||`` the norm of token j's value over all heads
    (ATS, eq. 4-5). Tokens marked invalid (padding) score 0.
    """
    vnorm = torch.linalg.vector_norm(v.float(), dim=(1, 3))  # [B, N]: over heads and head dim
    return ats_scores_from_norms(cls_attn, vnorm, num_prefix, valid)


def _indices_of(keep: torch.Tensor, num_prefix: int, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept patch-token mask ``[B, Np]`` -> (idx ``[B, P + M]`` with prefix first, valid ``[B, P + M]``).

    ``M`` is ``width`` (a static capacity: no host read) or, when None, the batch's largest kept count
    (one host read); shorter rows are padded with index 0 (a prefix token, harmless to gather) and
    ``valid=False``. Valid entries always form a prefix of each row.
    """
    b, n = keep.shape
    counts = keep.sum(dim=1)
    m = torch.sym_min(width, n) if width is not None else (int(counts.max()) if b > 0 else 0)
    # kept tokens first, each group in original order (stable sort)
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :m]
    valid_patch = torch.arange(m, device=keep.device)[None, :] < counts[:, None]
    idx_patch = torch.where(valid_patch, order + num_prefix, torch.zeros_like(order))
    prefix = torch.arange(num_prefix, device=keep.device).expand(b, num_prefix)
    idx = torch.cat([prefix, idx_patch], dim=1)
    valid = torch.cat([torch.ones(b, num_prefix, dtype=torch.bool, device=keep.device), valid_patch], dim=1)
    return idx, valid


def ats_select(
    scores: torch.Tensor, num_samples: int, min_tokens: int, num_prefix: int, valid: Optional[torch.Tensor] = None,
    width: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATS inverse-transform sampling: ``(idx, valid)`` padded to ``width`` patch tokens (a static
    capacity, ``max(num_samples, min_tokens)`` is always enough) or, when None, to the batch's largest
    kept count.

    Sort the scores, build their CDF, take ``num_samples`` evenly spaced points ``(i + 0.5) / K`` in
    (0, 1) and keep the token whose CDF step covers each point; repeated picks collapse, so each
    image keeps its own number of tokens (ATS, Sec. 3.2), at most ``num_samples``. An image that
    sampled fewer than ``min_tokens`` also keeps its ``min_tokens`` highest-scoring tokens (a floor;
    padding never counts). Prefix tokens are always kept and come first.

    Args:
        scores: ``[B, Np]`` from :func:`ats_scores`.
        num_samples: K, the most patch tokens an image keeps.
        min_tokens: floor on kept patch tokens (capped by the valid tokens an image has).
        num_prefix: prefix tokens in front of the patch tokens.
        valid: ``[B, P + Np]`` validity of the incoming tokens, or None.
    """
    b, n = scores.shape
    sorted_s, order = torch.sort(scores, dim=1)
    cdf = torch.cumsum(sorted_s, dim=1)
    points = (torch.arange(num_samples, device=scores.device, dtype=cdf.dtype) + 0.5) / num_samples
    pos = torch.searchsorted(cdf.contiguous(), points.expand(b, num_samples).contiguous()).clamp_(max=n - 1)
    picked_sorted = torch.zeros(b, n, dtype=torch.bool, device=scores.device).scatter_(1, pos, True)
    keep = torch.zeros_like(picked_sorted).scatter_(1, order, picked_sorted)
    if valid is not None:
        keep &= valid[:, num_prefix:]
    if min_tokens > 0:
        # images that sampled fewer than the floor also keep their min_tokens best (valid) tokens
        top = torch.zeros_like(picked_sorted)
        top[:, max(n - min_tokens, 0):] = True
        top = torch.zeros_like(top).scatter_(1, order, top)
        if valid is not None:
            top &= valid[:, num_prefix:]
        keep |= top & (keep.sum(1, keepdim=True) < min_tokens)
    return _indices_of(keep, num_prefix, width)


def topk_select(cls_attn: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """EViT/top-k: indices ``[B, P + keep]`` of the prefix tokens and the ``keep`` patch tokens with the
    highest head-averaged CLS attention, in original order."""
    score = cls_attn.float().mean(dim=1)[:, num_prefix:]
    top = torch.topk(score, keep, dim=1, largest=True, sorted=False).indices
    top = torch.sort(top, dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=top.device).expand(top.shape[0], num_prefix)
    return torch.cat([prefix, top], dim=1)


def evit_fuse(x: torch.Tensor, cls_attn: torch.Tensor, idx: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """EViT's fused token ``[B, 1, C]``: the dropped patch tokens summed with their head-averaged CLS
    attention as weights (EViT code: ``sum(non_topk * non_topk_attn)``, not renormalised)."""
    b, n, c = x.shape
    w = _up(cls_attn).mean(dim=1)  # [B, N]
    # out of place throughout: the ONNX export decomposes this function
    dropped = (torch.arange(n, device=x.device) >= num_prefix).expand(b, n)
    dropped = dropped.scatter(1, idx, torch.zeros_like(idx, dtype=torch.bool))
    w = (w * dropped).to(x.dtype)
    return torch.bmm(w.unsqueeze(1), x)  # [B, 1, C]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` with only the tokens ``idx`` ``[B, M]`` along ``dim`` (1 for ``[B, N, C]``, 2 for ``[B, H, N, D]``)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape
    index = idx.view(shape).expand(*[s if i != dim else idx.shape[1] for i, s in enumerate(x.shape)])
    return torch.gather(x, dim, index)


def valid_to_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Attention bias ``[B, 1, 1, M]``: 0 for valid keys, ``-inf`` for padding."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))
    return bias[:, None, None, :]


def stable_descending_order(v: torch.Tensor) -> torch.Tensor:
    """``torch.sort(v, dim=1, descending=True, stable=True).indices`` for ``v [B, N]`` without a sort: each value's
    rank is the number of values ahead of it (larger, or equal at a lower index), and the order scatters each
    index to its rank. Comparisons, a sum and a scatter are all ONNX has to offer for it (ONNX has no Sort, and
    its TopK, like ``torch.topk`` on a CPU, does not keep ties in index order); ``[B, N, N]`` booleans, as much
    as the similarity tables the merging policies already build."""
    n = v.shape[1]
    idx = torch.arange(n, device=v.device)
    vi, vj = v.unsqueeze(2), v.unsqueeze(1)  # [B, i, j]
    ahead = (vj > vi) | ((vj == vi) & (idx.view(1, 1, n) < idx.view(1, n, 1)))
    rank = ahead.sum(dim=2)
    return torch.zeros_like(rank).scatter(1, rank, idx.expand_as(rank).contiguous())


def tome_match(
    metric: torch.Tensor, r: int, num_prefix: int, by_topk: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching on the patch tokens.

    Patch tokens alternate into sets A (even) and B (odd); each A token is matched to its most similar
    B token (cosine similarity of ``metric``, keys averaged over heads); the ``r`` best-matched A tokens
    are merged into their B partners (ToMe, Sec. 3). Prefix tokens take no part, so they can never be
    merged (ToMe protects only CLS and distillation tokens by masking scores; here every prefix token
    is excluded, so register tokens are safe too). ``r`` is capped at ``|A|``.

    Returns:
        ``unm_idx [B, |A| - r]`` (A tokens kept, ascending), ``src_idx [B, r]`` (A tokens merged) and
        ``dst_idx [B, r]`` (their B partners), all indices within A or B.

    ``by_topk``: the form the ONNX export uses: the same order without a sort (:func:`stable_descending_order`
    for the edges; ``topk`` for the distinct unmerged indices), ties included.
    """
    m = metric[:, num_prefix:].float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]
    r = min(r, a.shape[1])
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    if by_topk:
        na = node_max.shape[1]
        edge_idx = stable_descending_order(node_max)
        unm_idx = torch.topk(edge_idx[:, r:], na - r, dim=1, largest=False, sorted=True).values  # (distinct values)
    else:
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
        unm_idx = torch.sort(edge_idx[:, r:], dim=1).values
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)
    return unm_idx, src_idx, dst_idx


def tome_merge(
    x: torch.Tensor,
    size: Optional[torch.Tensor],
    unm_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ToMe: returns ``(x', size')`` with ``[prefix, unmerged A, B]`` tokens.

    Each B token becomes the size-weighted average of itself and the A tokens merged into it; sizes add.
    """
    bsz, n, c = x.shape
    if size is None:
        size = torch.ones(bsz, n, 1, dtype=x.dtype, device=x.device)
    xs = torch.cat([x * size, size], dim=-1)  # carry size as an extra channel: one gather, one scatter
    prefix, patches = xs[:, :num_prefix], xs[:, num_prefix:]
    a, b = patches[:, ::2], patches[:, 1::2]
    unm = gather_tokens(a, unm_idx)
    src = gather_tokens(a, src_idx)
    b = b.scatter_add(1, dst_idx[..., None].expand(-1, -1, c + 1), src)
    out = torch.cat([prefix, unm, b], dim=1)
    new_size = out[..., -1:]
    return out[..., :-1] / new_size, new_size


def size_to_bias(size: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention: ``log(size)`` added to the logits of each key, ``[B, 1, 1, N]``."""
    return size.log()[..., 0][:, None, None, :]


def masked_mean(x: torch.Tensor, valid: torch.Tensor, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
    """Mean over the valid tokens of ``x[:, start:end]`` (pooling heads on padded batches)."""
    v = valid[:, start:end][..., None]
    return torch.where(v, x[:, start:end], 0).sum(1) / v.sum(1).clamp_min(1).to(x.dtype)


def sized_mean(x: torch.Tensor, size: torch.Tensor, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
    """Mean over ``x[:, start:end]`` weighted by ToMe sizes: the mean over the original patches."""
    w = size[:, start:end]
    return (x[:, start:end] * w).sum(1) / w.sum(1)


# --- packed (ragged) tokens ------------------------------------------------------------------------
# A packed batch holds the kept tokens of all images in one buffer, ``[1, T, C]`` (or ``[1, H, T, D]``
# for attention inputs), image after image; ``cu`` ``[B + 1]`` holds the offsets (``cu_seqlens``).
# The leading 1 keeps every row-wise op of the model (norms, linears, MLPs) valid as it is.


def packed_index(
    idx: torch.Tensor, valid: torch.Tensor, cu_in: Optional[torch.Tensor], like: torch.Tensor, token_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept positions ``idx`` / ``valid`` ``[B, M]`` -> ``(flat [T], cu [B + 1])`` into the packed rows.

    ``idx`` indexes each image's own tokens: a dense ``[B, N, ...]`` input when ``cu_in`` is None
    (``like`` supplies N along ``token_dim``), else the packed segments ``cu_in`` describes.
    """
    b = idx.shape[0]
    if cu_in is None:
        offsets = torch.arange(b, device=idx.device) * like.shape[token_dim]
    else:
        offsets = cu_in[:-1]
    flat = (idx + offsets[:, None])[valid]
    cu = torch.zeros(b + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(valid.sum(dim=1), dim=0, out=cu[1:])
    return flat, cu


def gather_packed(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Rows ``flat`` of ``x`` into a packed buffer.

    ``x`` is ``[B, N, C]`` or ``[1, T, C]`` (-> ``[1, T', C]``), or ``[B, H, N, D]`` / ``[1, H, T, D]``
    (-> ``[1, H, T', D]``). ``flat`` indexes the batch and token axes flattened.
    """
    if x.dim() == 3:
        return x.flatten(0, 1).index_select(0, flat).unsqueeze(0)  # (index_select: faster than x[flat] on a CPU)
    if x.shape[0] == 1:  # already packed: one index_select along the token axis
        return x.index_select(2, flat)
    n = x.shape[2]
    rows = x[flat // n, :, flat % n]  # one gather: [T', H, D]
    return rows.transpose(0, 1).unsqueeze(0)


def unpack_padded(x: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[1, T, C]`` / ``[1, H, T, D]`` -> padded ``[B, M, C]`` / ``[B, H, M, D]`` and ``valid [B, M]``."""
    lengths = cu[1:] - cu[:-1]
    b = lengths.shape[0]
    m = int(lengths.max()) if b > 0 else 0
    pos = torch.arange(m, device=cu.device)
    valid = pos[None, :] < lengths[:, None]
    src = (cu[:-1, None] + pos[None, :]).clamp(max=max(int(cu[-1]) - 1, 0))
    # padding is written as 0 with where(), not by multiplying: padding rows read other images'
    # tokens, and 0 * nan would let one image's NaN leak into its neighbours
    if x.dim() == 3:
        out = torch.where(valid[..., None], x[0][src], 0)
    else:
        out = torch.where(valid[:, None, :, None], x[0][:, src].permute(1, 0, 2, 3), 0)
    return out, valid


def packed_first(q: torch.Tensor, cu: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Token ``offset`` of every image: packed ``[1, H, T, D]`` -> ``[B, H, 1, D]``, ``[1, T, C]`` -> ``[B, C]``."""
    rows = cu[:-1] + offset
    if q.dim() == 3:
        return q[0, rows]
    return q[0][:, rows].transpose(0, 1).unsqueeze(2)


def packed_cls_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLS-row attention and value norms of packed tokens, read without unpacking ``k`` and ``v``.

    ``q``, ``k``, ``v`` are packed ``[1, H, T, D]`` with each image's CLS token first in its segment.
    Returns ``(cls_attn [B, H, M], vnorm [B, M], valid [B, M])`` padded to the longest image:
    what :func:`cls_attention` and the value norm of :func:`ats_scores` give on the padded tensors,
    at the cost of one ``[H, T, B]`` matmul and reads of ``[B, M]``-sized tables instead of two
    copies of ``k`` and ``v``.
    """
    lengths = cu[1:] - cu[:-1]
    b, t = lengths.shape[0], k.shape[2]
    m = int(lengths.max()) if b > 0 else 0
    pos = torch.arange(m, device=cu.device)
    valid = pos[None, :] < lengths[:, None]
    rows = (cu[:-1, None] + pos[None, :]).clamp(max=max(t - 1, 0))  # [B, M]
    q_cls = q[0][:, cu[:-1]]  # [H, B, D]
    # every token against every image's CLS query, then each token's own image: [H, T, B] -> [H, B, M]
    logits = torch.matmul(k[0], q_cls.transpose(1, 2))[:, rows, torch.arange(b, device=cu.device)[:, None]]
    logits = torch.where(valid, logits.float() * scale, float("-inf"))
    cls_attn = torch.softmax(logits, dim=-1).transpose(0, 1).to(q.dtype)
    vnorm = torch.linalg.vector_norm(v[0].float(), dim=(0, 2))[rows]  # over heads and head dim
    # padding is set with where(), never multiplied: a NaN in a neighbour's rows must not leak in
    return torch.where(valid[:, None], cls_attn, 0), torch.where(valid, vnorm, 0), valid


def ats_scores_from_norms(
    cls_attn: torch.Tensor, vnorm: torch.Tensor, num_prefix: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`ats_scores` given the value norms ``[B, N]`` (from :func:`packed_cls_scores`)."""
    s = (cls_attn.float().sum(dim=1) * vnorm.float())[:, num_prefix:]
    if valid is not None:
        s = torch.where(valid[:, num_prefix:], s, 0)
    return s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def packed_mean(x: torch.Tensor, cu: torch.Tensor, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
    """Per-image mean of packed ``[1, T, C]`` over each image's tokens ``start:end`` -> ``[B, C]``."""
    lengths = cu[1:] - cu[:-1]
    b, t = lengths.shape[0], x.shape[1]
    seg = torch.repeat_interleave(torch.arange(b, device=x.device), lengths, output_size=t)
    pos = torch.arange(t, device=x.device) - cu[:-1][seg]
    keep = pos >= start
    if end is not None:
        keep &= pos < (end if end >= 0 else lengths[seg] + end)
    w = keep.to(x.dtype)
    sums = torch.zeros(b, x.shape[2], dtype=x.dtype, device=x.device).index_add_(0, seg, x[0] * w[:, None])
    counts = torch.zeros(b, dtype=x.dtype, device=x.device).index_add_(0, seg, w)
    return sums / counts.clamp_min(1)[:, None]


# below this many keys an image's attention is a plain matmul-softmax-matmul: SDPA's fixed cost per
# call (about 0.1 ms here) outweighs its work on short sequences; at 250 keys the two tie and above
# 512 the fused kernel wins (``benchmarks/bench_varlen_attention.py``)
_SHORT_KEYS = 160


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """Attention of packed queries ``[1, H, Tq, D]``, each image over its own keys only.

    Keys/values are packed ``[1, H, Tk, D]`` with offsets ``cu_k``, or dense ``[B, H, N, D]`` when
    ``cu_k`` is None. Runs image by image on slices of the packed buffers, with no padding copies:
    on this CPU that beat one padded, masked SDPA (which needs q/k/v copied into a padded layout)
    and was about 7x faster than nested-tensor SDPA (``benchmarks/bench_varlen_attention.py``).
    """
    b, h, t, d = q.shape
    # [1, T, H, D] memory seen as [1, H, T, D]: the model's transpose(1, 2) + reshape after attention
    # then costs no copy
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    cq = cu_q.tolist()
    ck = cu_k.tolist() if cu_k is not None else None
    for i in range(len(cq) - 1):
        if cq[i + 1] == cq[i]:
            continue
        qi = q[0, :, cq[i]:cq[i + 1]]
        if ck is None:
            ki, vi = k[i], v[i]
        else:
            ki, vi = k[0, :, ck[i]:ck[i + 1]], v[0, :, ck[i]:ck[i + 1]]
        if ki.shape[1] <= _SHORT_KEYS and q.device.type == "cpu":
            logits = torch.matmul(qi, ki.transpose(1, 2)).float().mul_(scale)
            out[0, :, cq[i]:cq[i + 1]] = torch.matmul(logits.softmax(dim=-1).to(vi.dtype), vi)
        else:
            out[0, :, cq[i]:cq[i + 1]] = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, scale=scale)
    return out


def scatter_keep(idx: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]`` bool: which of the ``n`` tokens ``idx``/``valid`` keep (ATS "masked" mode)."""
    keep = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    # padding points at token 0, a prefix token that is always kept
    return keep.scatter_(1, torch.where(valid, idx, 0), True)


# --- token machinery: sync-free forms used by the realisation pass (tokenopt.passes.realize) -------
# Every function below reads no value back to the host: sizes come from shapes and static ints, so
# a graph built from them runs without device-to-host synchronisation and compiles whole.


def token_bias(valid: Optional[torch.Tensor], size: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias ``[B, 1, 1, N]``: ``-inf`` on invalid tokens, ``log(size)`` for merged ones
    (ToMe's proportional attention), 0 otherwise. At least one of ``valid``/``size`` is given."""
    if size is not None:
        bias = size[..., 0].log().to(dtype)
        if valid is not None:
            bias = bias.masked_fill(~valid, float("-inf"))
    else:
        bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


def value_norms(v: torch.Tensor) -> torch.Tensor:
    """Norm of each token's value over all heads: ``[B, H, N, D]`` -> ``[B, N]`` (at least float32)."""
    return torch.linalg.vector_norm(_up(v), dim=(1, 3))


def pad_indices(idx: torch.Tensor, valid: Optional[torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen ``idx``/``valid`` ``[B, M]`` to ``[B, width]`` (index 0, invalid) for the masked realisation."""
    b, m = idx.shape
    if valid is None:
        valid = torch.ones_like(idx, dtype=torch.bool)
    if width == m:
        return idx, valid
    pad = width - m
    return (torch.cat([idx, idx.new_zeros(b, pad)], 1),
            torch.cat([valid, valid.new_zeros(b, pad)], 1))


def gather_valid(valid_in: Optional[torch.Tensor], idx: torch.Tensor, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Validity of the gathered tokens: the decision's ``valid`` and the incoming one at ``idx``."""
    if valid_in is None:
        return valid
    kept = torch.gather(valid_in, 1, idx)
    return kept if valid is None else kept & valid


def tome_slots(
    metric: torch.Tensor, r: int, num_prefix: int, active: Optional[int] = None, by_topk: bool = False
) -> torch.Tensor:
    """ToMe's bipartite soft matching as a merge decision: the output slot of every token ``[B, N]``.

    On the first ``active`` tokens (all when None; the rest are padding and get slot -1): prefix
    tokens keep slots ``0..P-1``; the unmerged A tokens follow in order, then the B tokens; each merged
    A token takes its B partner's slot. The slot order is ToMe's ``[prefix, unmerged A, B]``
    (:func:`tome_match`), so later blocks match exactly as ToMe does.
    """
    bsz, n = metric.shape[:2]
    active = n if active is None else active
    unm, src, dst = tome_match(metric[:, :active], r, num_prefix, by_topk)
    na = (active - num_prefix + 1) // 2
    nb = (active - num_prefix) // 2
    n_unm = unm.shape[1]
    a_slot = torch.zeros(bsz, na, dtype=torch.long, device=metric.device)  # out of place: ONNX-friendly
    a_slot = a_slot.scatter(1, unm, torch.arange(n_unm, device=metric.device).expand(bsz, n_unm) + num_prefix)
    a_slot = a_slot.scatter(1, src, dst + num_prefix + n_unm)
    b_slot = (torch.arange(nb, device=metric.device) + num_prefix + n_unm).expand(bsz, nb)
    patch = torch.stack([a_slot[:, :nb], b_slot], dim=2).flatten(1)  # A, B alternate from the first patch
    if na > nb:
        patch = torch.cat([patch, a_slot[:, nb:]], 1)
    prefix = torch.arange(num_prefix, device=metric.device).expand(bsz, num_prefix)
    tail = torch.full((bsz, n - active), -1, dtype=torch.long, device=metric.device)
    return torch.cat([prefix, patch, tail], 1)


def merge_tokens(
    x: torch.Tensor, size: Optional[torch.Tensor], slot: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge into ``num_slots`` slots: token ``j`` goes to ``slot[:, j]`` (-1: dropped).

    Returns ``(x' [B, S, C], size' [B, S, 1])``; ``x'`` of a slot is the size-weighted mean of its tokens,
    ``size'`` their total size; an empty slot holds zeros and size 0. Written with ``scatter_add``
    (ONNX ``ScatterElements(add)``), not ``scatter_reduce(mean)``, which ONNX lacks.
    """
    bsz, n, c = x.shape
    if size is None:
        size = torch.ones(bsz, n, 1, dtype=x.dtype, device=x.device)
    size = size.to(x.dtype)
    live = slot >= 0
    w = torch.where(live[..., None], size, 0)
    xs = torch.cat([torch.where(live[..., None], x, 0) * w, w], dim=-1)
    index = slot.clamp(min=0)[..., None].expand(bsz, n, c + 1)
    out = torch.zeros(bsz, num_slots, c + 1, dtype=x.dtype, device=x.device).scatter_add(1, index, xs)
    new_size = out[..., c:]
    return out[..., :c] / new_size.clamp_min(torch.finfo(x.dtype).tiny), new_size


def slots_valid(slot: torch.Tensor, num_slots: int, valid_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, S]`` bool: which of the ``num_slots`` merge slots received a (valid) token."""
    live = slot >= 0
    if valid_in is not None:
        live = live & valid_in
    out = torch.zeros(slot.shape[0], num_slots, dtype=torch.long, device=slot.device)
    return out.scatter_add(1, slot.clamp(min=0), live.long()) > 0


def pack_index(
    idx: torch.Tensor, valid: torch.Tensor, cu_in: Optional[torch.Tensor], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept positions ``idx``/``valid`` ``[B, M]`` (valid a prefix of each row) ->
    ``(flat [T], cu [B + 1], longest [L])``.

    ``idx`` indexes each image's own tokens: a dense buffer of ``length`` tokens per image when
    ``cu_in`` is None, else the packed segments ``cu_in`` describes. ``T`` (the total kept count) and
    ``L`` (the longest image's count; ``longest`` is an empty tensor of that length, so the graph can
    read it as a size) are read back to the host in one value: the packed buffer's size depends on
    the data, and laying images out for attention needs no more room than the longest one.
    """
    b, m = idx.shape
    counts = valid.sum(dim=1)
    cu = torch.zeros(b + 1, dtype=torch.long, device=idx.device)
    cu[1:] = torch.cumsum(counts, dim=0)
    both = cu[-1] * (m + 1) + counts.max() if b > 0 else None  # two counts in one host read
    total, most = divmod(int(both), m + 1) if b > 0 else (0, 0)
    t = torch.arange(total, device=idx.device)
    seg = torch.searchsorted(cu, t, right=True) - 1
    pos = t - cu[seg]
    offsets = cu_in[:-1] if cu_in is not None else torch.arange(b, device=idx.device) * length
    flat = offsets[seg] + idx[seg, pos]
    return flat, cu, idx.new_empty(most, dtype=torch.int8)


def _segments(cu: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each image's tokens in a packed buffer, padded to ``capacity``: ``(rows, valid) [B, cap]``."""
    lengths = cu[1:] - cu[:-1]
    pos = torch.arange(capacity, device=cu.device)
    valid = pos[None, :] < lengths[:, None]
    rows = cu[:-1, None] + pos[None, :]
    return torch.where(valid, rows, 0), valid


def unpack(x: torch.Tensor, cu: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ``[1, T, C]`` / ``[1, H, T, D]`` -> padded ``[B, cap, C]`` / ``[B, H, cap, D]`` and ``valid [B, cap]``.

    ``capacity`` bounds every image's count (a static int), so nothing is read back to the host.
    Padding is written with ``where`` (never by multiplying, so a NaN cannot leak between images).
    """
    rows, valid = _segments(cu, capacity)
    if x.shape[-2 if x.dim() == 4 else 1] == 0:
        rows = torch.zeros_like(rows)
        x = torch.nn.functional.pad(x, (0, 0, 0, 1))
    if x.dim() == 3:
        return torch.where(valid[..., None], x[0][rows], 0), valid
    return torch.where(valid[:, None, :, None], x[0][:, rows].permute(1, 0, 2, 3), 0), valid


def repack(x: torch.Tensor, cu: torch.Tensor, total: int) -> torch.Tensor:
    """Padded ``[B, cap, C]`` / ``[B, H, cap, D]`` -> packed ``[1, T, C]`` / ``[1, H, T, D]`` with ``T = total``."""
    t = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu, t, right=True) - 1
    pos = t - cu[seg]
    if x.dim() == 3:
        return x[seg, pos].unsqueeze(0)
    return x[seg, :, pos].transpose(0, 1).unsqueeze(0)


def packed_cls_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, capacity: int, scale: float,
    size: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLS-row attention and value norms of packed tokens, padded to ``capacity``, without unpacking k/v.

    ``q, k, v`` packed ``[1, H, T, D]`` with each image's CLS token first in its segment; ``size``
    packed ``[1, T, 1]`` (proportional attention) or None. Returns ``(cls_attn [B, H, cap] float32,
    vnorm [B, cap] float32, valid [B, cap])``, what :func:`cls_attention` / :func:`value_norms` give on
    the unpacked tensors: one ``[H, T, B]`` matmul and ``[B, cap]`` table reads.
    """
    rows, valid = _segments(cu, capacity)
    b = rows.shape[0]
    q_cls = q[0][:, cu[:-1].clamp(max=max(q.shape[2] - 1, 0))]  # [H, B, D]
    logits = torch.matmul(k[0], q_cls.transpose(1, 2))  # [H, T, B]: every key against every CLS query
    logits = logits[:, rows, torch.arange(b, device=cu.device)[:, None]].float() * scale  # [H, B, cap]
    if size is not None:
        logits = logits + size[0, :, 0].float().log()[rows]
    logits = torch.where(valid, logits, float("-inf"))
    cls_attn = torch.softmax(logits, dim=-1).transpose(0, 1)
    vnorm = torch.linalg.vector_norm(v[0].float(), dim=(0, 2))[rows]
    return torch.where(valid[:, None], cls_attn, 0), torch.where(valid, vnorm, 0), valid


def varlen_attention_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: Optional[torch.Tensor],
    cap_q: int, cap_k: int, scale: float, key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of packed queries ``[1, H, Tq, D]``, each image over its own keys, with no host read.

    Keys/values are packed ``[1, H, Tk, D]`` with offsets ``cu_k`` (at most ``cap_k`` per image), or
    dense ``[B, H, N, D]`` when ``cu_k`` is None. The queries and keys of each image are laid out in a
    ``[B, H, cap, D]`` batch (``cap_*`` are static bounds), attended in one SDPA with padding keys
    masked, and the rows packed back: 6.4 ms against 14.3 ms for an explicit matmul-softmax-matmul and
    3.7 ms for a per-image loop (which needs the offsets on the host) at batch 32, 6 heads, 80-99
    tokens, on this CPU. ``key_bias`` ``[B, 1, 1, Nk]`` (dense keys) is added to the logits.
    """
    t = q.shape[2]
    rows, _ = _segments(cu_q, cap_q)
    # padding query rows read some real row; their outputs are never packed back, so no where() here
    qp = q[0][:, rows.clamp(max=max(t - 1, 0))].permute(1, 0, 2, 3) if t else q.new_zeros(rows.shape[0], q.shape[1], cap_q, q.shape[3])
    if cu_k is None:
        kp, vp, bias = k, v, key_bias
    else:
        kp, kvalid = unpack(k, cu_k, cap_k)
        vp, _ = unpack(v, cu_k, cap_k)
        bias = torch.zeros(kvalid.shape, dtype=q.dtype, device=q.device).masked_fill(~kvalid, float("-inf"))[:, None, None]
    # one batched SDPA (its fused CPU kernel takes the mask); every image has a real key (its prefix token)
    o = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=scale)
    return repack(o, cu_q, t)


def _equal_runs(lengths: list[int], keys: Optional[list] = None) -> list[tuple[int, int, int]]:
    """Consecutive images of one length (and one of ``keys``, when given: e.g. each image's head pattern):
    ``(first image, image count, first row)`` per run. ``lengths`` are Python ints (the shapes of a CPU
    ``tensor_split``), so grouping reads nothing back."""
    runs, row = [], 0
    for i, n in enumerate(lengths):
        if runs and lengths[runs[-1][0]] == n and (keys is None or keys[runs[-1][0]] == keys[i]):
            runs[-1][1] += 1
        else:
            runs.append([i, 1, row])
        row += n
    return [tuple(r) for r in runs]


def _run_view(t: torch.Tensor, row: int, count: int, length: int) -> torch.Tensor:
    """Rows ``row ..`` of a packed ``[1, H, T, D]`` buffer as ``[H, count, length, D]``: ``count`` images of
    ``length`` tokens each, a view (no copy: SDPA takes any leading batch dimensions)."""
    return t[0, :, row:row + count * length].view(t.shape[1], count, length, t.shape[3])


def _sdpa_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row: int, count: int, length: int,
              scale: float) -> torch.Tensor:
    """Attention of ``count`` packed images of ``length`` tokens each, from row ``row`` of ``[1, H, T, D]``
    buffers, each image over its own tokens: one batched SDPA, packed ``[1, H, count * length, D]`` out."""
    o = torch.nn.functional.scaled_dot_product_attention(*(_run_view(t, row, count, length) for t in (q, k, v)),
                                                         scale=scale)
    return o.view(1, o.shape[0], count * length, o.shape[3])


def varlen_attention_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: Optional[torch.Tensor],
    scale: float, key_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`varlen_attention_padded` without padding or a mask, for CPU tensors (where reading the offsets
    costs no device synchronisation): consecutive images with the same token count (every image before the
    first reduction; neighbours that kept as many) are one batched SDPA, the others one SDPA each on exactly
    their tokens. At batch 32, 80-99 tokens, DeiT-Small: 3.7 ms per image against 6.4 ms padded; at batch 64,
    197 tokens, 3 heads of 64: 14 ms batched against 16 ms image by image. The offsets split the buffers
    without an ``.item()`` (``tensor_split`` reads a CPU index tensor directly)."""
    qs = torch.tensor_split(q, cu_q[1:-1], dim=2)
    if cu_k is None:  # dense keys [B, H, N, D], per image
        ks, vs = k.unbind(0), v.unbind(0)
        bs = key_bias.unbind(0) if key_bias is not None else [None] * len(qs)
        outs = [torch.nn.functional.scaled_dot_product_attention(qi, ki[None], vi[None], scale=scale,
                                                                 attn_mask=bi[None] if bi is not None else None)
                for qi, ki, vi, bi in zip(qs, ks, vs, bs)]
    else:
        ks, vs = torch.tensor_split(k, cu_k[1:-1], dim=2), torch.tensor_split(v, cu_k[1:-1], dim=2)
        outs = []
        if all(qi.shape[2] == ki.shape[2] for qi, ki in zip(qs, ks)):  # queries = keys: runs of equal length
            for first, count, row in _equal_runs([qi.shape[2] for qi in qs]):
                n = qs[first].shape[2]
                outs.append(_sdpa_run(q, k, v, row, count, n, scale) if n
                            else q.new_empty(q.shape[0], q.shape[1], 0, v.shape[-1]))
        else:
            outs = [torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, scale=scale) if qi.shape[2] else qi
                    for qi, ki, vi in zip(qs, ks, vs)]
    if not outs:  # an empty batch
        return q.new_empty(q.shape[0], q.shape[1], 0, v.shape[-1])
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def packed_select(x: torch.Tensor, cu: torch.Tensor, index: int) -> torch.Tensor:
    """Token ``index`` of every image in packed ``[1, T, C]`` -> ``[B, C]`` (a prefix token: always present)."""
    return x[0, cu[:-1] + index]


def packed_weighted_mean(
    x: torch.Tensor, cu: torch.Tensor, size: Optional[torch.Tensor], start: int, end: Optional[int]
) -> torch.Tensor:
    """Per-image mean of packed ``[1, T, C]`` over each image's tokens ``start:end`` -> ``[B, C]``,
    weighted by ``size`` (``[1, T, 1]``) when given."""
    lengths = cu[1:] - cu[:-1]
    b, t = lengths.shape[0], x.shape[1]
    seg = torch.searchsorted(cu, torch.arange(t, device=x.device), right=True) - 1
    pos = torch.arange(t, device=x.device) - cu[:-1][seg]
    keep = pos >= start
    if end is not None:
        keep &= pos < (end if end >= 0 else lengths[seg] + end)
    w = keep.to(x.dtype)
    if size is not None:
        w = w * size[0, :, 0].to(x.dtype)
    sums = torch.zeros(b, x.shape[2], dtype=x.dtype, device=x.device).index_add(0, seg, x[0] * w[:, None])
    counts = torch.zeros(b, dtype=x.dtype, device=x.device).index_add(0, seg, w)
    return sums / counts.clamp_min(torch.finfo(x.dtype).tiny)[:, None]


def weighted_mean(
    x: torch.Tensor, valid: Optional[torch.Tensor], size: Optional[torch.Tensor], start: int = 0, end: Optional[int] = None
) -> torch.Tensor:
    """Mean over the valid tokens of ``x[:, start:end]``, weighted by ``size`` when given: what a
    pooling head computed over the original patches."""
    xs = x[:, start:end]
    w = torch.ones(xs.shape[:2] + (1,), dtype=x.dtype, device=x.device)
    if size is not None:
        w = size[:, start:end].to(x.dtype)
    if valid is not None:
        w = torch.where(valid[:, start:end, None], w, 0)
    return torch.where(w > 0, xs, 0).mul(w).sum(1) / w.sum(1).clamp_min(torch.finfo(x.dtype).tiny)


# --- dense restore: where every original token is now ---------------------------------------------
#
# ``home [B, N0]`` holds, for every original token, its row in the current buffer seen as 2-D rows
# (``[B * L, C]`` dense, ``[T, C]`` packed), or -1 once it left. A Keep, a merge or a packing maps old
# rows to new ones (a ``[rows]`` map, -1: gone); ``follow_rows`` moves ``home`` through it.


def token_home(like: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]``: every token's row in ``like`` ``[B, n, C]`` seen as ``[B * n, C]``."""
    b = like.shape[0]
    return (torch.arange(b, device=like.device)[:, None] * n + torch.arange(n, device=like.device)).contiguous()


def keep_map(idx: torch.Tensor, valid: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """``[B * length]``: each dense row's row after a Keep of rows ``idx`` ``[B, W]`` (each image's own,
    ``valid`` the real entries; padding entries may repeat rows); -1: dropped."""
    b, w = idx.shape
    new = torch.arange(b * w, device=idx.device).view(b, w)
    if valid is not None:
        new = torch.where(valid, new, -1)
    old = idx + torch.arange(b, device=idx.device)[:, None] * length
    return idx.new_full((b * length,), -1).scatter_reduce(0, old.reshape(-1), new.reshape(-1), "amax")


def slot_map(slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[B * L]``: each dense row's row after a merge into ``num_slots`` slots per image (-1: dropped)."""
    b = slot.shape[0]
    new = slot + torch.arange(b, device=slot.device)[:, None] * num_slots
    return torch.where(slot >= 0, new, -1).reshape(-1)


def follow_rows(home: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """``home`` moved through ``row_map`` (see above)."""
    moved = row_map[home.clamp_min(0)]
    return torch.where(home >= 0, moved, -1)


def dense_restore(x: torch.Tensor, home: torch.Tensor, dense: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, N0, C]``: every original token's current row of ``x`` (``[B, L, C]`` or packed ``[1, T, C]``; a
    merged token's row for each token it absorbed); tokens that left (``home < 0``) keep their value in
    ``dense``."""
    rows = x.reshape(-1, x.shape[-1])[home.clamp_min(0)]
    if dense is None:
        return rows
    return torch.where((home >= 0).unsqueeze(-1), rows, dense)


# --- adaptive halting (A-ViT) ---------------------------------------------------------------------


def act_step(y: torch.Tensor, h: torch.Tensor, cum: Optional[torch.Tensor], rem: Optional[torch.Tensor],
             rho: Optional[torch.Tensor], acc: Optional[torch.Tensor], active: Optional[torch.Tensor],
             eps: float, last: bool) -> tuple[torch.Tensor, ...]:
    """One block of adaptive computation time over token rows (A-ViT, Yin et al. 2022; METHODS.md).

    ``y`` ``[.., N, C]``: the block's output; ``h`` ``[.., N]``: halting scores; ``cum`` (cumulative
    score), ``rem`` (remainder), ``rho`` (ponder count) ``[.., N]`` and ``acc`` ``[.., N, C]`` (the
    accumulated output) from the previous halting block (None before the first: 0, 1, 0, 0);
    ``active`` ``[.., N]`` the tokens still running (None: all). ``last``: scores count as 1.

    A running token whose cumulative score passes ``1 - eps`` halts and adds ``rem * y``; one below it
    adds ``h * y`` and its remainder shrinks by ``h``; ``rho`` counts the blocks a token ran plus its
    remainder at halting. Returns ``(x_next, cum, rem, rho, acc, active)`` with ``x_next = y`` zeroed on
    tokens no longer running (what the next block reads).
    """
    a = torch.ones_like(h) if active is None else active.to(h.dtype)
    if cum is None:
        cum, rem, rho = torch.zeros_like(h), torch.ones_like(h), torch.zeros_like(h)
    if last:
        h = torch.ones_like(h)
    c = cum + h
    reached = (c > 1 - eps).to(h.dtype) * a
    running = (c < 1 - eps).to(h.dtype)
    # where(), not a product: an image whose tokens all halted may have produced non-finite rows
    delta = torch.where(a.unsqueeze(-1) > 0, y, 0) * (rem * reached + h * running).unsqueeze(-1)
    acc = delta if acc is None else acc + delta
    rho = rho + a + rem * reached
    rem = rem - running * h
    still = (running * a) > 0
    return torch.where(still.unsqueeze(-1), y, 0), c, rem, rho, acc, still


HALTED_LOGIT = -1000.0  # A-ViT's key bias for halted tokens: finite, so an image whose tokens all halted stays finite


def halt_bias(active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key bias ``[B, 1, 1, N]``: 0 for running tokens, ``HALTED_LOGIT`` for halted ones."""
    zero = torch.zeros(active.shape, dtype=dtype, device=active.device)
    return zero.masked_fill(~active, HALTED_LOGIT)[:, None, None, :]


def halt_pack(y: torch.Tensor, h: torch.Tensor, cum: Optional[torch.Tensor], rem: Optional[torch.Tensor],
              rho: Optional[torch.Tensor], grid: Optional[torch.Tensor], home: Optional[torch.Tensor],
              cu: Optional[torch.Tensor], eps: float, last: bool, n0: int) -> tuple[torch.Tensor, ...]:
    """:func:`act_step` for inference on packed tokens: the halted ones leave, their outputs land in a grid.

    ``y`` is the block output, dense ``[B, n0, C]`` (the first halting block, ``cu`` None) or packed
    ``[1, T, C]`` with offsets ``cu``; ``h``, ``cum``, ``rem``, ``rho`` are per row (``[B, n0]`` / ``[1, T]``;
    None before the first halting block); ``home`` ``[T]`` is each packed row's row in the output grid
    ``[B, n0, C]`` (None: dense ``y``, rows in grid order) and ``grid`` the outputs accumulated so far
    (None: zeros). Every row is running (halted ones were dropped), so each adds its ACT term
    (``rem`` if it halts now, else ``h``) times its state into its grid row, as :func:`act_step` adds
    it to ``acc``; the rows still running are then packed, in order, with their ``cum``/``rem``/``rho``
    and ``home``. Returns ``(x [1, T', C], cum, rem, rho [1, T'], grid [B, n0, C], home [T'], cu [B + 1],
    longest [L] (empty; its length is the longest image's count), running [rows of y])``. One host
    read (``T'`` and ``L`` together), none when ``last`` (every token halts: nothing is packed).
    """
    c_dim = y.shape[-1]
    b = y.shape[0] if cu is None else cu.shape[0] - 1
    rows = y.reshape(-1, c_dim)
    hh = torch.ones_like(h).reshape(-1) if last else h.reshape(-1)
    n = hh.shape[0]
    if cum is None:
        cum, rem, rho = torch.zeros_like(hh), torch.ones_like(hh), torch.zeros_like(hh)
    else:
        cum, rem, rho = cum.reshape(-1), rem.reshape(-1), rho.reshape(-1)
    if home is None:
        home = torch.arange(n, device=y.device)
    c = cum + hh
    reached = (c > 1 - eps).to(hh.dtype)
    running = c < 1 - eps
    w = rem * reached + hh * running.to(hh.dtype)
    grid = y.new_zeros(b * n0, c_dim) if grid is None else grid.reshape(-1, c_dim)
    grid = grid.index_add(0, home, rows * w[:, None].to(rows.dtype)).view(b, n0, c_dim)
    rho = rho + 1 + rem * reached
    rem = rem - running.to(hh.dtype) * hh
    cu_new = torch.zeros(b + 1, dtype=torch.long, device=y.device)
    if last or b == 0:
        total, most = 0, 0
    else:
        run = running.long()
        if cu is None:
            counts = run.view(b, -1).sum(1)
        else:
            cs = torch.nn.functional.pad(torch.cumsum(run, 0), (1, 0))
            counts = cs[cu[1:]] - cs[cu[:-1]]
        cu_new[1:] = torch.cumsum(counts, 0)
        total, most = divmod(int(cu_new[-1] * (n + 1) + counts.max()), n + 1)  # two counts in one host read
    if total:
        dest = torch.where(running, torch.cumsum(run, 0) - 1, total)  # each running row's new row
        flat = torch.zeros(total + 1, dtype=torch.long, device=y.device).scatter_(0, dest, torch.arange(n, device=y.device))[:total]
    else:
        flat = torch.zeros(0, dtype=torch.long, device=y.device)
    return (rows.index_select(0, flat)[None], c.index_select(0, flat)[None], rem.index_select(0, flat)[None],
            rho.index_select(0, flat)[None], grid, home.index_select(0, flat), cu_new,
            y.new_empty(most, dtype=torch.int8), running.view(h.shape))


# --- per-token side tables (rotary tables, relative-position biases) ------------------------------


def token_positions(like: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]``: every image's tokens at their original positions ``0..n-1`` (``like`` gives B)."""
    return torch.arange(n, device=like.device).expand(like.shape[0], n)


def side_gather(table: torch.Tensor, pos: torch.Tensor, axis: int, offset: int, rank: int) -> torch.Tensor:
    """A table indexed by original token position, for every image's current tokens.

    ``table`` has its token axis at ``axis`` (negative, counted from the right) covering original
    tokens ``offset..`` (``offset`` = prefix tokens for a patch-only rotary table); ``pos`` ``[B, L]``
    holds the original position of each current token (``pos[:, offset:]`` are the ones the table
    covers). Returns the table with that axis gathered per image, batch first, broadcastable against
    a ``rank``-dimensional operand: ``[B, 1, ..., *table.shape]`` with the token axis of size
    ``L - offset``.
    """
    while table.dim() > rank - 1 and table.shape[0] == 1:
        table = table[0]
    ax = table.dim() + axis
    idx = (pos[:, offset:] - offset).clamp(min=0)  # padding positions read row 0; they are masked anyway
    moved = table.movedim(ax, 0)  # [N, ...]
    out = moved[idx]  # [B, L', ...]
    out = out.movedim(1, ax + 1)  # the token axis back in place, batch in front
    return out.reshape(out.shape[:1] + (1,) * (rank - out.dim()) + out.shape[1:])


def pair_gather(table: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
    """A pairwise table ``[..., N, N]`` (a relative-position bias) for each image's current query and key
    tokens: ``[B, ..., Lq, Lk]`` (``pos_q`` ``[B, Lq]``, ``pos_k`` ``[B, Lk]`` original positions)."""
    lead = table.shape[:-2]
    while len(lead) and lead[0] == 1:
        table, lead = table[0], lead[1:]
    b = pos_q.shape[0]
    flat = table.reshape(-1, table.shape[-2], table.shape[-1])  # [G, N, N]
    rows = flat[:, pos_q]  # [G, B, Lq, N]
    out = torch.gather(rows, 3, pos_k[None, :, None, :].expand(rows.shape[0], b, pos_q.shape[1], pos_k.shape[1]))
    return out.movedim(1, 0).reshape((b,) + tuple(lead) + (pos_q.shape[1], pos_k.shape[1]))


def slot_positions(pos: torch.Tensor, slot: torch.Tensor, rep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Original positions after a merge: slot ``s`` takes the position of its representative token
    (``rep`` ``[B, L]`` True on the one token per slot that stands for it, e.g. ToMe's destination)."""
    target = torch.where(rep & (slot >= 0), slot, num_slots)  # everything else goes to a spare slot
    out = torch.zeros(pos.shape[0], num_slots + 1, dtype=pos.dtype, device=pos.device)
    return out.scatter(1, target, pos)[:, :num_slots]


def tome_representatives(slot: torch.Tensor, num_prefix: int, active: Optional[int] = None) -> torch.Tensor:
    """``[B, N]`` bool: the token that stands for its slot after ToMe merges: prefix tokens, every B
    token (the merge destinations) and the A tokens that were not merged (ToMe's surviving tokens)."""
    n = slot.shape[1]
    active = n if active is None else active
    j = torch.arange(n, device=slot.device)
    patch = j - num_prefix
    a_tokens = (patch >= 0) & (patch % 2 == 0) & (j < active)
    if active - num_prefix < 2:  # no B token: nothing was merged
        return slot >= 0
    # B tokens hold the last slots (P + unmerged A + b); an A token in that region was merged into one
    b_first = slot[:, num_prefix + 1:active:2].amin(dim=1, keepdim=True)
    merged_a = a_tokens & (slot >= b_first)
    return (slot >= 0) & ~merged_a


# --- learned token decisions (DynamicViT, SaiT) ----------------------------------------------------


def gumbel_keep(logp: torch.Tensor, gumbel: torch.Tensor) -> torch.Tensor:
    """DynamicViT's training-time keep decision: hard Gumbel-softmax (tau 1) over the predictor's two
    log-probabilities ``logp`` ``[B, N, 2]`` (keep, drop) with the Gumbel noise ``gumbel`` given, so the
    result is a function of its inputs. Returns ``[B, N]``: 1.0 where "keep" wins, else 0.0, with the
    straight-through gradient of the soft sample (``hard - soft.detach() + soft``)."""
    soft = (logp + gumbel).softmax(dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """Attention with DynamicViT's soft token mask (training form): ``keep`` ``[B, N]`` in [0, 1] weighs
    every key, except that each query always sees itself; weights renormalised with ``eps``:
    ``a = exp(l - max l) * m``, ``a = (a + eps / N) / (sum a + eps)`` with ``m[i, j] = keep[j]`` off the
    diagonal and 1 on it (``softmax_with_policy`` of the authors' code, in float32). ``bias``: the
    model's own additive attention mask (a relative-position bias, broadcastable to ``[B, H, N, N]``),
    part of the logits ``l`` as in the model.

    Computed without the ``[N, N]`` mask: ``a = E * keep[j] + [i = j] * E[i, i] * (1 - keep[i])`` with
    ``E = exp(l - max l)``, so the diagonal term is a per-query vector (``E[i, i]`` from ``q_i . k_i``)
    and ``a @ v`` is ``(E * keep) @ v + d * v + eps / N * sum(v)``: the same values in half the
    full-size passes (this op's backward recomputes it)."""
    n = k.shape[-2]
    qf, kf, vf = q.float(), k.float(), v.float()
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    diag = (qf * kf).sum(-1, keepdim=True) * scale  # [B, H, N, 1]: each query's logit for itself
    if bias is not None:
        b = bias.float()
        logits = logits + b
        diag = diag + b.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    top = logits.detach().amax(dim=-1, keepdim=True)  # (a shift for range only: its gradient is O(eps))
    m = keep.float()[:, None, None, :]
    e = (logits - top).exp() * m  # [B, H, N, N]
    own = (diag - top).exp() * (1.0 - m.transpose(-1, -2))  # [B, H, N, 1]
    num = torch.matmul(e, vf) + own * vf + (eps / n) * vf.sum(dim=-2, keepdim=True)
    den = e.sum(dim=-1, keepdim=True) + own + eps
    return (num / den).to(v.dtype)


def mass_select(cls_attn: torch.Tensor, density: torch.Tensor, num_prefix: int, valid: Optional[torch.Tensor],
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SaiT-style adaptive pruning: per image, the fewest patch tokens whose head-averaged CLS attention
    (renormalised over the image's patches) adds up to ``density`` (a 0-d tensor: the share of the
    mass kept; ``>= 1`` keeps every patch), in original order, after the prefix tokens. Returns
    ``(idx, valid)`` ``[B, P + width]`` with the kept ones first in each row (``width`` bounds the
    count: the patch tokens present)."""
    score = cls_attn.float().mean(dim=1)[:, num_prefix:]
    b, n = score.shape
    if valid is not None:
        score = torch.where(valid[:, num_prefix:], score, 0.0)
    score = score / score.sum(dim=1, keepdim=True).clamp_min(1e-12)
    ranked, order = torch.sort(score, dim=1, descending=True, stable=True)
    before = torch.cumsum(ranked, dim=1) - ranked  # mass of the tokens ranked above each one
    take = (before < density) | (density >= 1)
    if valid is not None:
        take = take & torch.gather(valid[:, num_prefix:], 1, order)
    take[:, :1] = True  # the highest-ranked patch always stays
    count = take.sum(dim=1, keepdim=True)
    # kept tokens back in original order: sort the ranks by (not taken, position)
    key = torch.where(take, order, n + order)
    pos = torch.sort(key, dim=1).values
    pos = torch.where(pos >= n, pos - n, pos)[:, :width] + num_prefix
    prefix = torch.arange(num_prefix, device=score.device).expand(b, num_prefix)
    idx = torch.cat([prefix, pos], dim=1)
    keep = torch.arange(num_prefix + width, device=score.device)[None, :] < count + num_prefix
    return idx, keep


# --- AdaViT: gates on heads, sub-layers and tokens --------------------------------------------------


def gumbel_gate(logits: torch.Tensor, noise: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    """AdaViT's training-time gate: hard Gumbel-sigmoid with a straight-through gradient. ``noise`` is
    the difference of two Gumbel samples (logistic noise), given so that the result is a function of its
    inputs: ``soft = sigmoid((logits + noise) / tau)``, ``hard = soft > threshold`` (1.0 / 0.0), returns
    ``hard - soft.detach() + soft`` (float32)."""
    soft = ((logits.float() + noise.float()) / tau).sigmoid()
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


def keep_select(keep: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept patch tokens ``keep [B, Np]`` (bool) -> ``(idx, valid)`` ``[B, P + Np]``: the prefix tokens,
    then each image's kept patches in their original order (a valid prefix of every row); no host read."""
    return _indices_of(keep, num_prefix, keep.shape[1])


def gate_rows(run: torch.Tensor, cu: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The images whose gate ``run [B]`` (bool) is on, and their rows: ``(rows, images, cu_sub)``.

    Dense tokens (``cu`` None): ``rows = images`` (indices into the batch) and ``cu_sub`` is empty.
    Packed tokens (offsets ``cu [B + 1]``): ``rows`` are the buffer rows of those images' tokens in
    order and ``cu_sub [K + 1]`` their offsets. One host read (how many images run).
    """
    images = run.nonzero().squeeze(1)
    if cu is None:
        return images, images.clone(), images.new_empty(0)
    if images.numel() == run.shape[0]:  # every image: every row
        return torch.arange(int(cu[-1] - cu[0]), device=cu.device) + cu[0], images, cu - cu[0]
    lengths = (cu[1:] - cu[:-1])[images]
    cu_sub = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    total = int(cu_sub[-1]) if images.numel() else 0
    t = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu_sub, t, right=True) - 1
    rows = cu[:-1][images][seg] + (t - cu_sub[seg])
    return rows, images, cu_sub


def take_rows(x: torch.Tensor, dim: int, rows: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, rows)`` for rows as :func:`gate_rows` gives them (distinct, ascending): when they
    are every row of ``x``, ``x`` itself (a gated sub-layer every image runs gathers nothing)."""
    return x if rows.numel() == x.shape[dim] else x.index_select(dim, rows)


def add_rows(x: torch.Tensor, dim: int, rows: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x.index_add(dim, rows, branch)`` for rows as :func:`gate_rows` gives them (distinct, ascending): when
    they are every row of ``x``, ``x + branch`` (one pass instead of a copy and a scatter)."""
    return x + branch if rows.numel() == x.shape[dim] else x.index_add(dim, rows, branch)


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, scale: float,
                   key_bias: Optional[torch.Tensor] = None, cu: Optional[torch.Tensor] = None,
                   capacity: int = 0) -> torch.Tensor:
    """Attention computed only for the (image, head) pairs whose gate ``heads [B, H]`` (bool) is on; the
    others' outputs are 0 (AdaViT's skipped heads). Dense ``[B, H, N, D]`` with an optional
    ``key_bias [B, 1, 1, N]``, or packed ``[1, H, T, D]`` with offsets ``cu`` (each image over its own
    tokens, at most ``capacity``). The active pairs are gathered into one SDPA batch ``[P, 1, N, D]``:
    one host read (how many pairs run)."""
    if cu is not None:
        qp, valid = unpack(q, cu, capacity)
        kp, _ = unpack(k, cu, capacity)
        vp, _ = unpack(v, cu, capacity)
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))[:, None, None]
        return repack(head_attention(qp, kp, vp, heads, scale, bias), cu, q.shape[2])
    b, h, n, d = q.shape
    pairs = heads.reshape(-1).nonzero().squeeze(1)
    out = q.new_zeros(b * h, n, v.shape[-1])
    if pairs.numel():
        pick = lambda t: t.reshape(b * h, t.shape[2], t.shape[3]).index_select(0, pairs)[:, None]  # noqa: E731
        mask = key_bias.index_select(0, pairs // h) if key_bias is not None else None
        o = torch.nn.functional.scaled_dot_product_attention(pick(q), pick(k), pick(v), attn_mask=mask, scale=scale)
        out = out.index_copy(0, pairs, o[:, 0])
    return out.view(b, h, n, v.shape[-1])


def _on_runs(on: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ``True`` in ``on``: ``(first, end)`` pairs (heads ``first .. end - 1``)."""
    runs, start = [], None
    for i, flag in enumerate(on + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def head_attention_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor, scale: float,
                            cu: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`head_attention` for CPU tensors, on exactly each image's tokens and the heads that are on,
    over views of the buffers (nothing gathered) and into one output buffer: dense ``[B, H, N, D]`` (with an
    optional ``key_bias [B, 1, 1, N]``) or packed ``[1, H, T, D]`` with offsets ``cu``.

    Consecutive images of one length and one head pattern are one run: one SDPA per stretch of consecutive
    heads that are on (a lone image, every image with all heads on before the first token reduction, ...);
    heads that are off are zero-filled, never computed. Gathering the (image, head) pairs that are on into one
    batch, as :func:`head_attention` does for CUDA, copies q, k and v: on this CPU at batch 64, 197 tokens,
    3 heads of 64, 92% of the heads on, 22.8 ms in runs against 27.5 ms gathered (plain SDPA over every
    head: 20-24 ms). The offsets and gates are CPU tensors: reading them (``tolist``) synchronises nothing."""
    h, dv = heads.shape[1], v.shape[-1]
    out = q.new_empty(q.shape[:-1] + (dv,))
    on = heads.tolist()
    if cu is None:  # dense: images first(..+count) as [H, count, N, D]
        lengths = [q.shape[2]] * q.shape[0]

        def view(t, first, row, count, n):
            return t[first:first + count].transpose(0, 1)
    else:
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

        def view(t, first, row, count, n):
            return _run_view(t, row, count, n)
    for first, count, row in _equal_runs(lengths, on):
        n = lengths[first]
        if not n:
            continue
        dst = view(out, first, row, count, n)  # [H, count, n, Dv], a view of the output
        mask = key_bias[first:first + count].transpose(0, 1) if key_bias is not None else None  # [1, count, 1, N]
        for a, b in _on_runs(on[first]):
            dst[a:b] = torch.nn.functional.scaled_dot_product_attention(
                *(view(t, first, row, count, n)[a:b] for t in (q, k, v)), attn_mask=mask, scale=scale)
        for a, b in _on_runs([not x for x in on[first]]):
            dst[a:b].zero_()
    return out


# --- PiToMe: energy-guided merging ------------------------------------------------------------------


def pitome_slots(metric: torch.Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0,
                 active: Optional[int] = None, best_edges: bool = False, by_topk: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PiToMe's merge decision (Tran et al., NeurIPS 2024) as slots: ``(slot [B, N], rep [B, N])``.

    On the patch tokens of the first ``active`` tokens (the rest are padding: slot -1): cosine
    similarities of the metric, an *energy* per token ``mean_j elu(cos_ij - margin, alpha)`` (high in
    dense clusters, low for isolated tokens), tokens ordered by energy (highest first); the ``2 r``
    highest are the merge candidates, alternately A and B, the others are protected; each A token
    merges into its most similar B token. Slots: prefix tokens first, then every token that stays a
    slot (protected and B tokens) in original order; an A token takes its B partner's slot. ``rep``
    marks the tokens that stand for their slot (all but the merged A tokens). ``best_edges``: the authors'
    "bsm" variant: every token goes to A or B alternately by energy rank and the ``r`` A tokens with the
    most similar partners merge (ToMe's rule on PiToMe's split). ``by_topk``: the same ranks without a sort
    (:func:`stable_descending_order`), the ONNX export form as in :func:`tome_match`.
    """
    def descending(v: torch.Tensor) -> torch.Tensor:
        if by_topk:
            return stable_descending_order(v)
        return torch.sort(v, dim=1, descending=True, stable=True).indices

    bsz, n = metric.shape[:2]
    active = n if active is None else active
    t = active - num_prefix
    m = torch.nn.functional.normalize(metric[:, num_prefix:active].float(), dim=-1)
    sim = m @ m.transpose(1, 2)
    energy = torch.nn.functional.elu(sim - margin, alpha=alpha).mean(dim=-1)
    order = descending(energy)
    if best_edges:  # every token in A or B by energy rank; the r A tokens with the best matches merge
        a, b = order[:, 0::2], order[:, 1::2]
        pair = sim.gather(1, a[..., None].expand(bsz, a.shape[1], t)).gather(2, b[:, None, :].expand(bsz, a.shape[1], b.shape[1]))
        best, partner = pair.max(dim=-1)
        src = descending(best)[:, :r]
        a, dst = a.gather(1, src), b.gather(1, partner.gather(1, src))
    else:
        a, b = order[:, 0:2 * r:2], order[:, 1:2 * r:2]
        pair = sim.gather(1, a[..., None].expand(bsz, r, t)).gather(2, b[:, None, :].expand(bsz, r, r))
        dst = b.gather(1, pair.argmax(dim=-1))  # each A token's most similar B token
    stays = torch.ones(bsz, t, dtype=torch.bool, device=metric.device).scatter(1, a, False)
    rank = stays.long().cumsum(dim=1) - 1 + num_prefix
    slot = rank.scatter(1, a, rank.gather(1, dst))
    prefix = torch.arange(num_prefix, device=metric.device).expand(bsz, num_prefix)
    tail = torch.full((bsz, n - active), -1, dtype=torch.long, device=metric.device)
    ones = torch.ones(bsz, num_prefix, dtype=torch.bool, device=metric.device)
    rep = torch.cat([ones, stays, torch.zeros(bsz, n - active, dtype=torch.bool, device=metric.device)], 1)
    return torch.cat([prefix, slot, tail], 1), rep
