"""Op vocabularies and small graph predicates shared by the analysis and rewrite passes.

Everything here matches ATen targets as ``torch.export`` emits them; nothing looks at module classes
or attribute names.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

SDPA_OPS = {aten.scaled_dot_product_attention.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
LINEAR_OPS = {aten.linear.default}
NORM_OPS = {aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default}
ADD_OPS = {aten.add.Tensor, aten.add_.Tensor, operator.add}
MUL_OPS = {aten.mul.Tensor, aten.mul_.Tensor, operator.mul}
DIV_OPS = {aten.div.Tensor, aten.div_.Tensor, operator.truediv}
TRANSPOSE_OPS = {aten.transpose.int, aten.permute.default, aten.swapaxes.default, aten.t.default}
# ops that leave a tensor's values (or the token axis) alone in eval mode
IDENTITY_OPS = {
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
}
# elementwise activations seen between MLP linears
ACTIVATION_OPS = {
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.mish.default,
    aten.quick_gelu.default if hasattr(aten, "quick_gelu") else aten.gelu.default,
}
# per-token ops: act on each token independently, so they commute with gathering tokens
ROWWISE_OPS = (
    IDENTITY_OPS | NORM_OPS | LINEAR_OPS | ACTIVATION_OPS | ADD_OPS | MUL_OPS | DIV_OPS
    | {aten.sub.Tensor, aten.mul.Scalar, aten.add.Scalar, aten.chunk.default, aten.split.Tensor}
)
SLICE_OPS = {aten.slice.Tensor}
SELECT_OPS = {aten.select.int}
MEAN_OPS = {aten.mean.dim}
CAT_OPS = {aten.cat.default}
INT64_MAX = 9223372036854775807


def is_call(node: Any, targets: set) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Optional[torch.Tensor]:
    """The FakeTensor recorded by export (or None for non-tensor nodes)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def rank(node: Any) -> int:
    v = val(node)
    return v.dim() if v is not None else -1


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim > 0 else dim


def scalar_operand(node: fx.Node) -> Optional[tuple[Any, float]]:
    """For ``x * c`` / ``x / c`` with a Python scalar ``c``: ``(x, factor)``; else None."""
    a, b = node.args[0], node.args[1]
    if is_call(node, MUL_OPS):
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            return a, float(b)
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return b, float(a)
    if is_call(node, DIV_OPS) and isinstance(b, (int, float)) and isinstance(a, fx.Node):
        return a, 1.0 / float(b)
    return None


def swaps_last_two(node: fx.Node) -> bool:
    """True for transpose(-2, -1) / permute that swaps only the last two axes."""
    nd = rank(node)
    if node.target in (aten.transpose.int, aten.swapaxes.default):
        dims = {norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)}
        return dims == {nd - 2, nd - 1}
    if node.target == aten.permute.default:
        perm = [norm_dim(p, nd) for p in node.args[1]]
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    if node.target == aten.t.default:
        return nd == 2
    return False


def is_param(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def set_sdpa_mask(sdpa: fx.Node, mask: Any) -> None:
    """Set the ``attn_mask`` of an SDPA node, wherever (positional or keyword) it was given."""
    if len(sdpa.args) > 3:
        sdpa.update_arg(3, mask)
    else:
        sdpa.update_kwarg("attn_mask", mask)
