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

from tokenopt.ir import META_ROLE, stamp
from tokenopt.passes import patterns as P
from tokenopt.passes.find_blocks import _module_path, get_model_info
from tokenopt.passes.realize import RewriteError

__all__ = ["canonicalize_attention"]


def _trivial_masks(gm: fx.GraphModule, masks: set) -> set:
    """The masks among ``masks`` that change nothing: all True (bool) or all 0 (additive), and built
    without reading the image (Hugging Face builds an all-True ``[B, 1, N, N]`` mask from ``arange``).

    They are evaluated once on the example inputs; a mask that depends on image values, or on a
    parameter or buffer (a relative-position table that is all zeros before training, or before
    ``load_state_dict``), is never called trivial, whatever its value now.
    """
    from tokenopt.passes.find_blocks import image_dependent_nodes

    image_dependent = image_dependent_nodes(gm)
    weights = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
    candidates = {m for m in masks if m not in image_dependent and not _reads_weights(m, weights)}
    if not candidates or "tokenopt.example_inputs" not in gm.meta:
        return set()
    values = P.record(gm, candidates, *gm.meta["tokenopt.example_inputs"])
    return {
        m for m, v in values.items()
        if isinstance(v, torch.Tensor) and (bool(v.all()) if v.dtype == torch.bool else bool((v == 0).all()))
    }


def _reads_weights(node: fx.Node, weights: set) -> bool:
    """Whether ``node``'s value is computed from a parameter or buffer of the graph (values a later
    ``load_state_dict`` can change)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and n.target in weights:
            return True
        stack.extend(n.all_input_nodes)
    return False


def canonicalize_attention(gm: fx.GraphModule) -> PassResult:
    """Replace every manual attention chain of the found blocks by one SDPA node, and drop attention
    masks that mask nothing.

    A chain whose intermediate results are used elsewhere (attention maps returned by the model, for
    instance) is left as it is; reduction passes then refuse that block with a message.
    """
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()  # values export keeps but nothing uses (MultiheadAttention's mean weights)
    dead = before - len(gm.graph.nodes)
    info = get_model_info(gm)
    _check_layouts(info, gm.meta.get("tokenopt.static_batch"))
    trivial = _trivial_masks(gm, {b.attention.attn_mask for b in info.blocks if b.attention.attn_mask is not None})
    dropped, model_masks = 0, {blk.index: blk.attention.attn_mask for blk in info.blocks}
    for blk in info.blocks:
        att = blk.attention
        if att.attn_mask in trivial:
            att.attn_mask = None
            dropped += 1
            if att.kind == "sdpa":
                P.set_sdpa_mask(att.core, None)
    done = head = 0
    # the blocks' attention, and a head's attention over the tokens (vit-pytorch's CaiT class attention)
    cores = [(blk.index, blk.attention, model_masks[blk.index]) for blk in info.blocks]
    cores += [(None, r.attention, r.attention.attn_mask) for r in info.head_readers
              if r.kind == "attn_pool" and r.attention is not None]
    for index, att, mask in cores:
        if att.kind != "manual" or att.head_mix:  # heads mixed around the softmax: SDPA cannot say that
            continue
        chain = _chain(att.matmul_qk, att.core, mask)
        for node in chain[:-1]:  # metadata checks on the chain's values go with it
            for user in [u for u in node.users if u.op == "call_function" and u.target in P.ASSERT_OPS]:
                gm.graph.erase_node(user)
        if any(len(n.users) != 1 for n in chain[:-1]):
            continue
        scores = P.match_scores(att.matmul_qk)[1]
        with gm.graph.inserting_before(att.core):
            k = att.k
            if scores.k_perm is not None:  # keys read in another layout: [..., N, D] for SDPA
                k = gm.graph.call_function(torch.ops.aten.permute.default, (scores.k, list(scores.k_perm)))
                k.meta["val"] = P.val(scores.k).permute(scores.k_perm)
                stamp(k, block=index)
            sdpa = gm.graph.call_function(
                torch.ops.aten.scaled_dot_product_attention.default,
                (att.q, k, att.v),
                {"attn_mask": att.attn_mask, "scale": att.scale} if att.attn_mask is not None else {"scale": att.scale},
            )
        sdpa.meta["val"] = att.core.meta.get("val")
        stamp(sdpa, block=index)  # (sets META_BLOCK for a block's core)
        if index is not None:
            sdpa.meta[META_ROLE] = "attn.core"
        att.core.replace_all_uses_with(sdpa)
        for node in reversed(chain):
            if not node.users:
                gm.graph.erase_node(node)
        att.kind, att.core, att.softmax, att.matmul_qk = "sdpa", sdpa, None, None
        if index is None:
            head += 1
        else:
            done += 1
    gm.graph.eliminate_dead_code()
    gm.meta.setdefault("tokenopt.counters", {})["canonicalize_attention"] = {
        "sdpa": done, "head_sdpa": head, "masks_dropped": dropped, "dead_nodes": dead}
    if done + head + dropped + dead:  # model facts are re-derived from the rewritten graph, not patched
        gm.recompile()
        from tokenopt.passes.find_blocks import find_blocks

        find_blocks(gm)
    return PassResult(gm, done + head + dropped + dead > 0)


canonicalize_attention.requires = ("model_info",)
canonicalize_attention.ensures = ("model_info",)


def _check_layouts(info, static_batch=None) -> None:
    """Refuse, before any rewriting, attention that runs sequence-first (``[N, B, C]``) or with the heads
    folded into the batch (``[B * H, N, D]``): ``nn.MultiheadAttention`` does both, and the token count
    then hides in sizes such as ``N * B`` that no rewrite can tell apart from the batch."""
    batch = P.val(info.image_input).shape[0]
    for blk in info.blocks:
        att = blk.attention
        if P.rank(att.q) == 4 and str(P.val(att.q).shape[0]) != str(batch):
            raise RewriteError(
                f"block {blk.index} ({_module_path(att.core) or blk.module_path or 'unknown module'}): attention "
                f"{att.core.name} runs over windows (its batch axis is {P.val(att.q).shape[0]}, images x windows of "
                f"{P.val(att.q).shape[2]} tokens: Swin, SAM's windowed blocks), and each window is cut from a "
                "fixed grid of tokens, so a token dropped or merged would break every window after it; "
                "tokenopt does not reduce windowed attention. Fix: policy='none' runs the model as captured; "
                "reduce a ViT whose attention spans all tokens")
        nodes = [n for n in blk.nodes if P.val(n) is not None and P.rank(n) >= 2]
        # [tokens, batch, ...]: the batch is a symbol (or the size export fixed it at, see capture)
        seq_first = next((n for n in nodes if isinstance(P.val(n).shape[0], int) and P.val(n).shape[0] == blk.tokens
                          and (not isinstance(P.val(n).shape[1], int) or P.val(n).shape[1] == static_batch)), None)
        if seq_first is None and P.rank(att.q) == 4:
            continue
        how = (f"runs sequence-first ({seq_first.name} is [tokens, batch, ...])" if seq_first is not None
               else f"folds its heads into the batch axis (q {att.q.name} is [batch * heads, tokens, head_dim])")
        raise RewriteError(
            f"block {blk.index} ({_module_path(att.core) or blk.module_path or 'unknown module'}): attention "
            f"{att.core.name} {how}, as "
            "nn.MultiheadAttention does; token reduction rewrites [B, N, C] token streams and [B, H, N, D] "
            "attention only, since the token count would otherwise hide in sizes mixed with the batch. "
            "Fix: policy='none' runs the model as captured; to reduce, compute this attention with "
            "F.scaled_dot_product_attention on [B, H, N, D] tensors (timm's Attention, with the in_proj / "
            "out_proj weights loaded into qkv / proj)."
        )


def _chain(start: fx.Node, end: fx.Node, mask) -> list[fx.Node]:
    """Nodes from ``start`` (q k^T) to ``end`` (attn @ v) along the logits path, in order."""
    nodes, node = [end], P.scores_input(end)
    nodes.append(node)
    while node is not start:
        node = next(a for a in node.args if isinstance(a, fx.Node) and a is not mask)
        nodes.append(node)
    return list(reversed(nodes))
