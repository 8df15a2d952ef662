"""The fused Triton token kernels as ``torch.library`` custom ops ``tokenopt::triton_*``.

Each op runs a Triton kernel (``tokenopt/kernels/triton/``) and equals a chain of the plain-PyTorch
references in :mod:`tokenopt.kernels.reference` (named in its docstring), which the kernel tests hold
it to. Every op has a fake (meta) implementation, so ``torch.compile`` and ``torch.export`` see
shapes through it, and a rewritten graph prints it by name (``torch.ops.tokenopt.triton_varlen_attention``).
Ops whose output length depends on the data (ATS's kept count, the padded length of an unpack) give
it as an unbacked symbolic size.

Triton is imported when an op first runs, not when this module is imported: ``import tokenopt``
works without Triton. The ops need CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1`` set before
Triton was imported (how the tests run them on a machine without a GPU).

Example:
    >>> import os, torch
    >>> os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU here: Triton's interpreter on CPU
    '1'
    >>> import tokenopt.kernels.fused  # registers torch.ops.tokenopt.triton_*
    >>> x = torch.arange(12.0).view(1, 4, 3)
    >>> torch.ops.tokenopt.triton_gather_packed(x, torch.tensor([3, 0]))
    tensor([[[ 9., 10., 11.],
             [ 0.,  1.,  2.]]])
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, get_ctx

__all__ = [
    "triton_available",
    "varlen_attention",
    "gather_packed",
    "unpack_padded",
    "gather_tokens",
    "ats_select_dense",
    "ats_select_packed",
    "topk_gather",
    "tome_merge",
]


def triton_available() -> bool:
    """Whether Triton can be imported here (without importing it into this process's state twice)."""
    return importlib.util.find_spec("triton") is not None


def _kernels(module: str, *tensors: Tensor):
    """The Triton launcher module ``tokenopt.kernels.triton.<module>``, imported on first use."""
    t = tensors[0]
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"tokenopt Triton kernels run on CUDA tensors, got {t.device.type} tensors; on CPU run the graph "
            "without fused kernels (tokenopt.optimize(..., kernels='reference')), or set TRITON_INTERPRET=1 "
            "before importing triton to use Triton's (slow) CPU interpreter"
        )
    try:
        return importlib.import_module(f"tokenopt.kernels.triton.{module}")
    except ImportError as exc:
        raise RuntimeError("tokenopt's fused kernels need Triton: pip install 'tokenopt[triton]'") from exc


# --- attention and data movement -----------------------------------------------------------------


@custom_op("tokenopt::triton_varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], scale: float) -> Tensor:
    """Packed queries ``[1, H, Tq, D]``, each image over its own keys = ``reference.varlen_attention``."""
    return _kernels("attention", q).varlen_attention(q, k, v, cu_q, cu_k, scale)


@varlen_attention.register_fake
def _(q, k, v, cu_q, cu_k, scale):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d).transpose(1, 2)


@custom_op("tokenopt::triton_gather_packed", mutates_args=())
def gather_packed(x: Tensor, flat: Tensor) -> Tensor:
    """Rows ``flat`` of ``x`` into a packed buffer = ``reference.gather_packed``."""
    return _kernels("gather", x).gather_packed(x, flat)


@gather_packed.register_fake
def _(x, flat):
    if x.dim() == 3:
        return x.new_empty(1, flat.shape[0], x.shape[2])
    return x.new_empty(1, x.shape[1], flat.shape[0], x.shape[3])


@custom_op("tokenopt::triton_unpack_padded", mutates_args=())
def unpack_padded(x: Tensor, cu: Tensor) -> tuple[Tensor, Tensor]:
    """Packed -> padded ``[B, M, ...]`` and ``valid [B, M]`` = ``reference.unpack_padded``."""
    return _kernels("gather", x).unpack_padded(x, cu)


@unpack_padded.register_fake
def _(x, cu):
    b, m = cu.shape[0] - 1, get_ctx().new_dynamic_size()
    shape = (b, m, x.shape[2]) if x.dim() == 3 else (b, x.shape[1], m, x.shape[3])
    return x.new_empty(shape), x.new_empty(b, m, dtype=torch.bool)


@custom_op("tokenopt::triton_gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """``x`` with only the tokens ``idx [B, M]`` along ``dim`` = ``reference.gather_tokens``."""
    return _kernels("gather", x).gather_tokens(x, idx, dim)


@gather_tokens.register_fake
def _(x, idx, dim):
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    return x.new_empty(shape)


# --- scoring and selection -----------------------------------------------------------------------


def _fake_selection(b, like: Tensor):
    m = get_ctx().new_dynamic_size()
    return like.new_empty(b, m, dtype=torch.long), like.new_empty(b, m, dtype=torch.bool)


@custom_op("tokenopt::triton_ats_select_dense", mutates_args=())
def ats_select_dense(
    q: Tensor, k: Tensor, v: Tensor, scale: float, num_prefix: int, num_samples: int, min_tokens: int,
    valid: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """CLS-row scores, ATS sampling and the kept indices in one op =
    ``cls_attention`` -> ``ats_scores`` -> ``ats_select`` (with ``valid_to_bias(valid)`` as bias)."""
    return _kernels("select", q).ats_select_dense(q, k, v, scale, num_prefix, num_samples, min_tokens, valid)


@ats_select_dense.register_fake
def _(q, k, v, scale, num_prefix, num_samples, min_tokens, valid=None):
    return _fake_selection(q.shape[0], q)


@custom_op("tokenopt::triton_ats_select_packed", mutates_args=())
def ats_select_packed(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, scale: float, num_prefix: int, num_samples: int, min_tokens: int
) -> tuple[Tensor, Tensor]:
    """The same on packed q/k/v = ``packed_cls_scores`` -> ``ats_scores_from_norms`` -> ``ats_select``."""
    return _kernels("select", q).ats_select_packed(q, k, v, cu, scale, num_prefix, num_samples, min_tokens)


@ats_select_packed.register_fake
def _(q, k, v, cu, scale, num_prefix, num_samples, min_tokens):
    return _fake_selection(cu.shape[0] - 1, q)


@custom_op("tokenopt::triton_topk_gather", mutates_args=())
def topk_gather(
    x: Tensor, q: Tensor, k: Tensor, scale: float, keep: int, num_prefix: int, fuse: bool,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """EViT top-k: ``cls_attention`` -> ``topk_select`` -> ``gather_tokens`` (+ ``evit_fuse``)."""
    return _kernels("select", x).topk_gather(x, q, k, scale, keep, num_prefix, fuse, bias)


@topk_gather.register_fake
def _(x, q, k, scale, keep, num_prefix, fuse, bias=None):
    extra = 1 if fuse and keep < x.shape[1] - num_prefix else 0
    return x.new_empty(x.shape[0], num_prefix + keep + extra, x.shape[2])


@custom_op("tokenopt::triton_tome_merge", mutates_args=())
def tome_merge(x: Tensor, k: Tensor, size: Optional[Tensor], r: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """ToMe: ``mean(k, heads)`` -> ``tome_match`` -> ``tome_merge``, returning ``(x', size')``."""
    return _kernels("tome", x).tome_merge_fused(x, k, size, r, num_prefix)


@tome_merge.register_fake
def _(x, k, size, r, num_prefix):
    b, n, c = x.shape
    a = (n - num_prefix + 1) // 2
    n_out = n - min(r, a)
    dtype = x.dtype if size is None else torch.promote_types(x.dtype, size.dtype)  # as x * size does
    return x.new_empty(b, n_out, c, dtype=dtype), x.new_empty(b, n_out, 1, dtype=dtype)
