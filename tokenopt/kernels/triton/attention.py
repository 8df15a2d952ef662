"""Variable-length (packed) attention forward: one flash-attention kernel for every image of a batch.

Equals :func:`tokenopt.kernels.reference.varlen_attention`. Queries are packed ``[1, H, Tq, D]``:
image ``i`` owns query rows ``cu_q[i]:cu_q[i + 1]``. Keys and values are either packed
``[1, H, Tk, D]`` with offsets ``cu_k``, or dense ``[B, H, N, D]`` (``cu_k`` is None), where image
``i`` attends to all ``N`` keys of batch row ``i``. Each image attends to its own keys only.

The kernel is the flash-attention forward pass (online softmax, fp32 accumulators, ``tl.dot`` for
``q k^T`` and ``p v``) with one program per (query block, head, image). Query blocks are counted over
the longest image; programs past the end of a shorter image exit at once, so ragged batches never
need a padded copy of q, k or v. Strides are passed for every tensor, so q/k/v may be views of a
fused qkv projection (``[B, N, 3, H, D]`` permuted to ``[B, H, N, D]``).

Edge cases:

* Images with no queries write nothing (as the reference, which skips them).
* An image with queries but no keys (cannot come out of a token policy: the CLS token is always
  kept) gets zero output rows, which is what the reference gives on CPU (softmax over an empty key
  axis, then a product with an empty value matrix).
* Query rows outside every image (``cu_q[-1] < Tq``) are left unwritten, as in the reference.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["varlen_attention"]

# exp(x) = exp2(x * log2(e)): exp2 is the cheaper instruction on GPUs, so the scale folds log2(e) in
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128


@triton.jit
def _varlen_attention_fwd_kernel(
    Q, K, V, O, CU_Q, CU_K,
    stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_oh, stride_ot, stride_od,
    n_dense_keys, head_dim, qk_scale_log2,
    PACKED_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One block of ``BLOCK_M`` queries of one image and one head, over all keys of that image."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    image = tl.program_id(2)

    q_start = tl.load(CU_Q + image).to(tl.int64)
    q_len = tl.load(CU_Q + image + 1).to(tl.int64) - q_start
    # the grid covers the longest image: blocks past the end of this one have nothing to do
    if pid_m * BLOCK_M >= q_len:
        return

    if PACKED_KEYS:
        k_start = tl.load(CU_K + image).to(tl.int64)
        k_len = tl.load(CU_K + image + 1).to(tl.int64) - k_start
        k_base = K + head * stride_kh + k_start * stride_kt
        v_base = V + head * stride_vh + k_start * stride_vt
    else:
        k_len = n_dense_keys
        # int64 batch offset: B * H * N * D can pass 2**31 elements for large batches
        k_base = K + image.to(tl.int64) * stride_kb + head * stride_kh
        v_base = V + image.to(tl.int64) * stride_vb + head * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    # the head dim is padded to a power of two; padded lanes load 0 and add nothing to q . k
    d_ok = offs_d < head_dim

    q_ptrs = Q + head * stride_qh + (q_start + offs_m)[:, None] * stride_qt + offs_d[None, :] * stride_qd
    # rows past the image load 0: their logits are finite, so no NaN appears; they are not stored
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        # keys past the image get -inf; every block holds at least one real key (start_n < k_len),
        # so the row max stays finite and exp2(s - m) never sees -inf - -inf
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 on the first block)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # p in the value dtype for the second product (fp16 tensor cores), accumulated in fp32
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # an image without keys never entered the loop: l = 0 and acc = 0, and the rows come out 0
    # (the reference's softmax over an empty axis times an empty value matrix) instead of 0 / 0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + head * stride_oh + (q_start + offs_m)[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check_offsets(name: str, cu: torch.Tensor, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be a 1-D tensor of B + 1 offsets, got {getattr(cu, 'shape', type(cu))}")
    if cu.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Attention of packed queries, each image over its own keys only (flash-attention forward).

    Args:
        q: packed queries ``[1, H, Tq, D]`` (any strides), fp16/bf16/fp32, ``D <= 128``.
        k: keys, packed ``[1, H, Tk, D]`` when ``cu_k`` is given, else dense ``[B, H, N, D]``;
            same dtype and device as ``q``.
        v: values, same shape as ``k``.
        cu_q: ``[B + 1]`` int64 query offsets: image ``i`` owns query rows ``cu_q[i]:cu_q[i + 1]``.
        cu_k: ``[B + 1]`` int64 key offsets into packed ``k``/``v``, or None for dense keys.
        scale: multiplier of the logits ``q . k``.

    Returns:
        ``[1, H, Tq, D]`` in ``q``'s dtype, stored as ``[1, Tq, H, D]`` (``transpose(1, 2)`` of a
        contiguous tensor, like the reference), so the model's transpose + reshape after attention
        is free. Query rows outside every image (past ``cu_q[-1]``) are not written.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim], got {getattr(t, 'shape', type(t))}")
    if q.shape[0] != 1:
        raise ValueError(f"q must be packed with a leading 1, [1, H, Tq, D], got {tuple(q.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    _, h, tq, d = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k/v must have q's heads and head dim ({h}, {d}), got {tuple(k.shape)}")
    if d > _MAX_HEAD_DIM or d < 1:
        raise ValueError(f"head dim must be in 1..{_MAX_HEAD_DIM}, got {d}")
    _check_offsets("cu_q", cu_q, q.device)
    b = cu_q.numel() - 1
    if cu_k is None:
        if k.shape[0] != b:
            raise ValueError(f"dense k/v [B, H, N, D] need B = len(cu_q) - 1 = {b} rows, got {tuple(k.shape)}")
    else:
        _check_offsets("cu_k", cu_k, q.device)
        if cu_k.numel() != b + 1:
            raise ValueError(f"cu_k must have len(cu_q) = {b + 1} offsets, got {cu_k.numel()}")
        if k.shape[0] != 1:
            raise ValueError(f"packed k/v must be [1, H, Tk, D] when cu_k is given, got {tuple(k.shape)}")

    # same allocation as the reference: [1, Tq, H, D] memory seen as [1, H, Tq, D]
    out = torch.empty(1, tq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    if b == 0 or tq == 0 or h == 0:
        return out

    # the grid needs the longest image; one host sync also checks the offsets against the buffers
    # (the reference syncs too, reading both offset tables with tolist())
    len_q = cu_q[1:] - cu_q[:-1]
    stats = [len_q.max(), len_q.min(), cu_q[0], cu_q[-1]]
    if cu_k is not None:
        len_k = cu_k[1:] - cu_k[:-1]
        stats += [len_k.max(), len_k.min(), cu_k[0], cu_k[-1]]
    stats = torch.stack(stats).tolist()
    max_q, min_q, first_q, last_q = stats[:4]
    if min_q < 0 or first_q < 0 or last_q > tq:
        raise ValueError(f"cu_q must be non-decreasing offsets within [0, {tq}], got {cu_q.tolist()}")
    max_k = k.shape[2]
    if cu_k is not None:
        max_k, min_k, first_k, last_k = stats[4:]
        if min_k < 0 or first_k < 0 or last_k > k.shape[2]:
            raise ValueError(f"cu_k must be non-decreasing offsets within [0, {k.shape[2]}], got {cu_k.tolist()}")
    if max_q == 0:
        return out

    # tl.dot needs every block dim >= 16; the head dim is padded to a power of two and masked
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, max(16, triton.next_power_of_2(max_q)))
    # keep the [BLOCK_N, BLOCK_D] k and v tiles of large heads within the register budget
    block_n = min(64 if block_d <= 64 else 32, max(16, triton.next_power_of_2(max(max_k, 1))))
    # fp32 inputs: full-precision products like PyTorch's default (TF32 would lose ~3 digits); the
    # option is ignored for fp16/bf16 inputs
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    grid = (triton.cdiv(max_q, block_m), h, b)
    _varlen_attention_fwd_kernel[grid](
        q, k, v, out, cu_q, cu_k if cu_k is not None else cu_q,
        q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(1), out.stride(2), out.stride(3),
        k.shape[2], d, float(scale) * _LOG2E,
        PACKED_KEYS=cu_k is not None,
        DOT_PRECISION=precision,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out
