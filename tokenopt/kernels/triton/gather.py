"""Row gathers: packing kept tokens, unpacking to a padded batch, and per-image token selection.

One Triton kernel moves rows; three launchers give it the index tables of
:func:`tokenopt.kernels.reference.gather_packed`, :func:`~tokenopt.kernels.reference.unpack_padded`
and :func:`~tokenopt.kernels.reference.gather_tokens`, and return the same values (bit for bit:
the kernel only loads and stores).

The kernel's view of a tensor: ``G`` groups (attention heads, or 1) of rows ``[R, C]``, where a row
is addressed by two coordinates (batch row ``b``, token ``n``) with their own strides, so that
``[B, N, C]`` and ``[B, H, N, D]`` tensors with any strides (slices, views of a fused qkv
projection) are read in place, without a ``contiguous()`` copy. Output row ``i`` of every group
reads source row ``(b, n)`` with

* ``n = idx[i]`` and ``b = i // M`` when the indices are per image (``gather_tokens``: ``idx`` is
  ``[B, M]``, each row indexing its own image's tokens), or
* ``b = idx[i] // N``, ``n = idx[i] % N`` when they index the batch and token axes flattened
  (``gather_packed``, ``unpack_padded``),

and rows whose validity flag is False are written as 0 without reading the source, so a NaN in
another image cannot leak into padding. Indices out of range are not checked on the host (that
would cost a device sync); the kernel masks them and writes 0 rows instead of faulting, where the
reference raises an index error.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_rows", "gather_packed", "unpack_padded", "gather_tokens"]


@triton.jit
def _gather_rows_kernel(
    X, OUT, IDX, VALID,
    n_out, n_cols, n_src_tokens, n_src_batch, out_rows_per_batch,
    stride_xg, stride_xb, stride_xn, stride_xc,
    stride_og, stride_ob, stride_om, stride_oc,
    LOCAL_INDEX: tl.constexpr,
    HAS_VALID: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Copy ``BLOCK_R`` output rows x ``BLOCK_C`` columns of one group (``program_id(1)``)."""
    pid_r = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)

    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_out
    col_ok = cols < n_cols

    idx = tl.load(IDX + rows, mask=row_ok, other=0).to(tl.int64)
    # output row i sits at (batch i // M, position i % M) of the output
    out_b = rows // out_rows_per_batch
    out_m = rows % out_rows_per_batch
    if LOCAL_INDEX:
        src_b = out_b
        src_n = idx
    else:
        src_b = idx // n_src_tokens
        src_n = idx % n_src_tokens
    # out-of-range indices read nothing (0 is written) rather than faulting
    read = row_ok & (idx >= 0) & (src_n < n_src_tokens) & (src_b < n_src_batch)
    if HAS_VALID:
        # padding rows are never read: a masked load yields exactly 0, even where the source is NaN
        read = read & (tl.load(VALID + rows, mask=row_ok, other=0) != 0)

    src = X + group * stride_xg + src_b[:, None] * stride_xb + src_n[:, None] * stride_xn + cols[None, :] * stride_xc
    vals = tl.load(src, mask=read[:, None] & col_ok[None, :], other=0)
    dst = OUT + group * stride_og + out_b[:, None] * stride_ob + out_m[:, None] * stride_om + cols[None, :] * stride_oc
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


def _block_sizes(n_cols: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a whole row per program when it fits, about 16 KB moved per program."""
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    block_r = max(1, min(64, 16384 // (block_c * element_size)))
    return triton.next_power_of_2(block_r), block_c


def gather_rows(
    x: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    valid: torch.Tensor | None = None,
    local_index: bool = False,
) -> torch.Tensor:
    """Write ``x``'s rows selected by ``idx`` into ``out`` (the generic launcher behind the others).

    Args:
        x: source ``[G, B, N, C]`` (any strides; a 3-D ``[B, N, C]`` is read as ``G = 1``).
        idx: ``[R]`` integer row indices (any shape, flattened in order): into the flattened
            ``(B, N)`` axes, or, with ``local_index``, token indices within batch row ``i // M``.
        out: destination ``[G, Bo, M, C]`` (any strides, ``Bo * M = R``; 3-D is ``G = 1``), written in full.
        valid: optional ``[R]`` bool; False rows are written as 0 and their source is not read.
        local_index: whether ``idx`` holds per-image token indices (see above).

    Returns:
        ``out``.
    """
    result = out
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if out.dim() == 3:
        out = out.unsqueeze(0)
    if x.dim() != 4 or out.dim() != 4:
        raise ValueError(f"gather_rows needs x [G, B, N, C] and out [G, Bo, M, C], got {tuple(x.shape)}, {tuple(out.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"row indices must be int64 (or int32), got {idx.dtype}")
    if idx.device != x.device or out.device != x.device:
        raise ValueError(f"x, indices and output must be on one device, got {x.device}, {idx.device}, {out.device}")
    if out.dtype != x.dtype:
        raise TypeError(f"output dtype {out.dtype} differs from x's {x.dtype}")
    g, b, n, c = x.shape
    _, out_b, m, _ = out.shape
    idx = idx.reshape(-1)
    n_out = idx.numel()
    if out.shape[0] != g or out.shape[3] != c or out_b * m != n_out:
        raise ValueError(f"output {tuple(out.shape)} does not hold {n_out} rows of x {tuple(x.shape)}")
    if local_index and out_b != b:
        raise ValueError(f"per-image indices need one output batch row per x batch row, got {out_b} and {b}")
    if valid is not None:
        if valid.dtype != torch.bool or valid.numel() != n_out or valid.device != x.device:
            raise ValueError(f"valid must be a bool tensor of {n_out} flags on {x.device}, got {valid.dtype} {tuple(valid.shape)}")
        valid = valid.reshape(-1)
    if n_out == 0 or c == 0 or g == 0:
        return result
    if b * n == 0:
        # nothing to read: every index is out of range, and out-of-range rows are written as 0
        return result.zero_()
    idx = idx.contiguous()
    if valid is not None:
        # the kernel reads the flags as bytes
        valid = valid.contiguous().view(torch.uint8)

    block_r, block_c = _block_sizes(c, x.element_size())
    grid = (triton.cdiv(n_out, block_r), g, triton.cdiv(c, block_c))
    _gather_rows_kernel[grid](
        x, out, idx, valid if valid is not None else idx,
        n_out, c, n, b, m,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        LOCAL_INDEX=local_index,
        HAS_VALID=valid is not None,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
    )
    return result


def _check_index(name: str, idx: torch.Tensor, dim: int, x: torch.Tensor) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D index tensor, got {getattr(idx, 'shape', type(idx))}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {idx.dtype}")
    if idx.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {idx.device}")


def gather_packed(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Rows ``flat`` of ``x`` into a packed buffer (``reference.gather_packed``).

    Args:
        x: ``[B, N, C]`` / ``[1, T, C]``, or ``[B, H, N, D]`` / ``[1, H, T, D]`` (any strides).
        flat: ``[T']`` int64 indices into the batch and token axes flattened (``b * N + n``).

    Returns:
        ``[1, T', C]`` contiguous for 3-D ``x``; ``[1, H, T', D]`` (contiguous) for 4-D ``x``.
    """
    _check_index("flat", flat, 1, x)
    if x.dim() == 3:
        out = torch.empty(1, flat.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
        return gather_rows(x, flat, out)
    if x.dim() == 4:
        b, h, n, d = x.shape
        out = torch.empty(1, h, flat.shape[0], d, dtype=x.dtype, device=x.device)
        # heads are the kernel's groups: x as [H, B, N, D], out as [H, 1, T', D]
        gather_rows(x.transpose(0, 1), flat, out.transpose(0, 1))
        return out
    raise ValueError(f"x must be [B, N, C] or [B, H, N, D], got {tuple(x.shape)}")


def unpack_padded(x: torch.Tensor, cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed -> padded batch (``reference.unpack_padded``).

    Args:
        x: packed ``[1, T, C]`` or ``[1, H, T, D]`` (any strides).
        cu: ``[B + 1]`` int64 offsets: image ``i`` owns rows ``cu[i]:cu[i + 1]``.

    Returns:
        ``(padded, valid)``: ``[B, M, C]`` or ``[B, H, M, D]`` with ``M`` the longest image (padding
        rows exactly 0, whatever other rows hold), and ``valid [B, M]`` bool.
    """
    _check_index("cu", cu, 1, x)
    if x.dim() not in (3, 4) or x.shape[0] != 1:
        raise ValueError(f"x must be packed [1, T, C] or [1, H, T, D], got {tuple(x.shape)}")
    if cu.numel() < 1:
        raise ValueError("cu must hold B + 1 offsets, got an empty tensor")
    lengths = cu[1:] - cu[:-1]
    b = lengths.shape[0]
    m = int(lengths.max()) if b > 0 else 0  # output shape: one host sync, as in the reference
    pos = torch.arange(m, device=cu.device)
    valid = pos[None, :] < lengths[:, None]
    # padding rows point at row 0 (never read: the kernel skips rows flagged invalid)
    src = torch.where(valid, cu[:-1, None] + pos[None, :], 0)
    if x.dim() == 3:
        out = torch.empty(b, m, x.shape[2], dtype=x.dtype, device=x.device)
        gather_rows(x, src, out, valid)
    else:
        h, d = x.shape[1], x.shape[3]
        out = torch.empty(b, h, m, d, dtype=x.dtype, device=x.device)
        # x as [H, 1, T, D] (heads are the groups), out as [H, B, M, D]
        gather_rows(x.transpose(0, 1), src, out.transpose(0, 1), valid)
    return out, valid


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` with only the tokens ``idx`` of each image along ``dim`` (``reference.gather_tokens``).

    Args:
        x: ``[B, N, C]`` with ``dim=1``, or ``[B, H, N, D]`` with ``dim=2`` (any strides).
        idx: ``[B, M]`` int64 token indices, each row into its own image.
        dim: the token axis, 1 or 2 as above.

    Returns:
        ``[B, M, C]`` or ``[B, H, M, D]``, contiguous.
    """
    _check_index("idx", idx, 2, x)
    if (x.dim(), dim) not in ((3, 1), (4, 2)):
        raise ValueError(f"gather_tokens takes [B, N, C] with dim=1 or [B, H, N, D] with dim=2, got {tuple(x.shape)}, dim={dim}")
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx [B, M] must have x's batch size {x.shape[0]}, got {tuple(idx.shape)}")
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if dim == 1:
        return gather_rows(x, idx, out, local_index=True)
    gather_rows(x.transpose(0, 1), idx, out.transpose(0, 1), local_index=True)
    return out
