"""FLOP estimates from the concrete shapes ShapeProp recorded (``node.meta["tensor_meta"]``).

Counts the ops that dominate a ViT (linear, attention, matmul, convolution) at 2 FLOPs per
multiply-add; elementwise ops are left out, as is usual in the token-reduction papers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["node_flops", "count_flops"]


def _shape(node) -> Optional[tuple[int, ...]]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def node_flops(node: fx.Node) -> int:
    """FLOPs of one node on the shapes of the last ShapeProp run (0 for ops not counted)."""
    if node.op != "call_function":
        return 0
    out = _shape(node)
    t = node.target
    if t == aten.linear.default and out is not None:
        w = _shape(node.args[1])
        return 2 * math.prod(out) * w[1] if w else 0
    if t == aten.scaled_dot_product_attention.default:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if q is None or k is None:
            return 0
        # q k^T and attn @ v: 2 * (2 * B*H*Nq*Nk*D)
        return 4 * math.prod(q[:-1]) * k[-2] * q[-1]
    if t in (aten.matmul.default, aten.bmm.default) and out is not None:
        a = _shape(node.args[0])
        return 2 * math.prod(out) * a[-1] if a else 0
    if getattr(t, "__name__", "") == "varlen_attention":
        # packed queries [1, H, Tq, D] against each image's keys; per-image lengths are not in the
        # shapes, so this assumes equal lengths (exact for dense keys, a slight undercount otherwise)
        q, k, cu = _shape(node.args[0]), _shape(node.args[1]), _shape(node.args[3])
        if q is None or k is None or cu is None:
            return 0
        images = max(cu[0] - 1, 1)
        keys_per_image = k[2] if k[0] > 1 else k[2] / images
        return int(4 * q[1] * q[2] * keys_per_image * q[3])
    if t == aten.conv2d.default and out is not None:
        w = _shape(node.args[1])
        return 2 * math.prod(out) * math.prod(w[1:]) if w else 0
    return 0


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = query_shape
    return 4 * b * h * nq * key_shape[-2] * d


def _varlen_attention_flops(q, k, v, cu_q, cu_k, *args, out_val=None, **kwargs) -> int:
    """Packed attention: each image's queries against its own keys, from the offsets (raw tensors)."""
    lq = (cu_q[1:] - cu_q[:-1]).double()
    lk = (cu_k[1:] - cu_k[:-1]).double() if cu_k is not None else torch.full_like(lq, k.shape[-2])
    return int(4 * q.shape[1] * q.shape[-1] * float((lq * lk).sum()))


_varlen_attention_flops._get_raw = True  # (FlopCounterMode hands it the tensors, not their shapes)


def _head_attention_flops(q, k, v, heads, scale, key_bias=None, cu=None, capacity=0, *args, out_val=None, **kwargs) -> int:
    """Attention of the (image, head) pairs that are on only: per image, its tokens squared times its heads."""
    per_image = heads.sum(dim=1).double()
    if cu is None:
        return int(4 * q.shape[-2] * k.shape[-2] * q.shape[-1] * float(per_image.sum()))
    lengths = (cu[1:] - cu[:-1]).double()
    return int(4 * q.shape[-1] * float((lengths * lengths * per_image).sum()))


_head_attention_flops._get_raw = True


def _policy_attention_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(q_shape[:-1]) * k_shape[-2] * q_shape[-1]


def _cls_attention_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(k_shape[:-1]) * k_shape[-1]  # the CLS query against every key


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)``, counted op by op as it runs (so per-image token
    counts and the inserted token ops are included). Uses ``torch.utils.flop_counter``, taught the
    CPU flash-attention op it does not know and tokenopt's attention ops (whose inner calls it does not
    see): packed attention counted image by image from its offsets, gated heads only where they run."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    import tokenopt.kernels.ops  # noqa: F401  (the token ops: a custom op's inner calls are not seen)

    mapping[torch.ops.tokenopt.varlen_attention] = _varlen_attention_flops  # (keyed by overload packet)
    mapping[torch.ops.tokenopt.policy_attention] = _policy_attention_flops
    mapping[torch.ops.tokenopt.head_attention] = _head_attention_flops
    mapping[torch.ops.tokenopt.cls_attention] = _cls_attention_flops
    # the counter tracks modules with autograd hooks, which fail on a parameter passed to a submodule
    # as an input (CaiT's class token, a MAP head's query) while it requires grad: off for the count
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
    try:
        for p in params:
            p.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
            fn(*args, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(True)
    return counter.get_total_flops()
