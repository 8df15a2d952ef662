"""Rewrite pass: turn manual attention chains into ``aten.scaled_dot_product_attention``.

``matmul(q * s, k^T) -> softmax -> matmul(., v)`` (timm with ``fused_attn=False``, Hugging Face
"eager", hand-written ViTs) becomes one SDPA node with the scale and mask ``find_blocks`` read. After
this pass every block has the same attention form, so reduction passes handle one pattern, masks and
biases go in as SDPA's ``attn_mask`` and the fused attention kernel runs.

Reads ``gm.meta[MODEL_INFO]``; updates each block's ``AttentionInfo`` in place (``kind="sdpa"``,
``core`` the new node). Counter: ``gm.meta["tokenopt.counters"]["canonicalize_attention"]``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import META_BLOCK, META_ROLE, stamp
from tokenopt.passes import patterns as P
from tokenopt.passes.find_blocks import get_model_info

__all__ = ["canonicalize_attention"]


def _trivial_masks(gm: fx.GraphModule, masks: set) -> set:
    """The masks among ``masks`` that change nothing: all True (bool) or all 0 (additive), and built
    without reading the image (Hugging Face builds an all-True ``[B, 1, N, N]`` mask from ``arange``).

    They are evaluated once on the example inputs; a mask that depends on image values is never
    called trivial, whatever its value on the example.
    """
    from tokenopt.passes.find_blocks import image_dependent_nodes

    image_dependent = image_dependent_nodes(gm)
    candidates = {m for m in masks if m not in image_dependent}
    if not candidates or "tokenopt.example_inputs" not in gm.meta:
        return set()
    values: dict = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in candidates:
                values[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*gm.meta["tokenopt.example_inputs"])
    return {
        m for m, v in values.items()
        if isinstance(v, torch.Tensor) and (bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all()))
    }


def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    """Replace every manual attention chain of the found blocks by one SDPA node, and drop attention
    masks that mask nothing.

    A chain whose intermediate results are used elsewhere (attention maps returned by the model, for
    instance) is left as it is; reduction passes then refuse that block with a message.
    """
    info = get_model_info(gm)
    trivial = _trivial_masks(gm, {b.attention.attn_mask for b in info.blocks if b.attention.attn_mask is not None})
    dropped, model_masks = 0, {blk.index: blk.attention.attn_mask for blk in info.blocks}
    for blk in info.blocks:
        att = blk.attention
        if att.attn_mask in trivial:
            att.attn_mask = None
            dropped += 1
            if att.kind == "sdpa":
                P.set_sdpa_mask(att.core, None)
    done = 0
    for blk in info.blocks:
        att = blk.attention
        if att.kind != "manual":
            continue
        chain = _chain(att.matmul_qk, att.core, model_masks[blk.index])
        if any(len(n.users) != 1 for n in chain[:-1]):
            continue
        with gm.graph.inserting_before(att.core):
            sdpa = gm.graph.call_function(
                torch.ops.aten.scaled_dot_product_attention.default,
                (att.q, att.k, att.v),
                {"attn_mask": att.attn_mask, "scale": att.scale} if att.attn_mask is not None else {"scale": att.scale},
            )
        sdpa.meta["val"] = att.core.meta.get("val")
        sdpa.meta[META_ROLE] = "attn.core"
        stamp(sdpa, block=blk.index)
        att.core.replace_all_uses_with(sdpa)
        for node in reversed(chain):
            if not node.users:
                gm.graph.erase_node(node)
        att.kind, att.core, att.softmax, att.matmul_qk = "sdpa", sdpa, None, None
        sdpa.meta[META_BLOCK] = blk.index
        done += 1
    gm.graph.eliminate_dead_code()
    gm.meta.setdefault("tokenopt.counters", {})["canonicalize_attention"] = {"sdpa": done, "masks_dropped": dropped}
    if done + dropped:  # model facts are re-derived from the rewritten graph, not patched
        gm.recompile()
        from tokenopt.passes.find_blocks import find_blocks

        find_blocks(gm)
    return PassResult(gm, done + dropped > 0)


canonicalize_attention.requires = ("model_info",)
canonicalize_attention.ensures = ("model_info",)


def _chain(start: fx.Node, end: fx.Node, mask) -> list[fx.Node]:
    """Nodes from ``start`` (q k^T) to ``end`` (attn @ v) along the logits path, in order."""
    nodes, node = [end], end
    while node is not start:
        node = next(a for a in node.args if isinstance(a, fx.Node) and a is not mask)
        nodes.append(node)
    return list(reversed(nodes))
