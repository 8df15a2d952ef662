"""retarget_token_sizes: give reshapes that had the captured token count baked in their run-time sizes.

Run by the realisation pass (:mod:`tokenopt.passes.realize`) once tokens have been dropped, merged or
packed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from tokenopt.ir import META_BLOCK, META_PROVENANCE, META_ROLE, stamp
from tokenopt.passes import patterns as P
from tokenopt.passes.find_blocks import get_model_info
from tokenopt.passes.realize import RewriteError

__all__ = ["RewriteError", "retarget_token_sizes"]

aten = torch.ops.aten


def _same_size(size: Any, key: Any) -> bool:
    """``size`` (an int, or a node / SymInt for a symbolic size) is the captured size ``key``."""
    if isinstance(size, fx.Node):
        size = size.meta.get("val")
    if isinstance(key, int):
        return isinstance(size, int) and not isinstance(size, bool) and size == key
    return isinstance(size, torch.SymInt) and str(size) == str(key)


def _same_dim(size: Any, src: fx.Node, j: int) -> bool:
    """``size`` (a target shape entry) is axis ``j`` of ``src``: the same static size or symbol, or
    ``sym_size(src, j)`` itself."""
    if isinstance(size, fx.Node) and size.target == aten.sym_size.int and size.args[:2] == (src, j):
        return True
    return _same_size(size, P.val(src).shape[j])


def _static_minus_one(shape: list, src: fx.Node, out: Any, keys: tuple) -> Any:
    """The captured value of the -1 in ``shape`` (a reshape of ``src``) when it stands only for sizes no
    token reduction changes, else None.

    It does when ``src``'s token axes (and batch axis) stay axes of their own at the same place in
    ``shape`` and the axes the -1 absorbs are static channel-like sizes: Hugging Face's
    ``view(x, [B, N, -1, D])`` (heads split out of the channels), ``[B, -1, N, D]`` and ``[B, N, -1]``.
    A -1 over a flattened batch or token axis (``[B * N, C] -> [B, -1, C]``) is left to be inferred.
    """
    src_val = P.val(src)
    if out is None or src_val is None or shape.count(-1) != 1:
        return None
    i = shape.index(-1)
    covered = {j for j in range(min(len(shape), src_val.dim())) if j != i and _same_dim(shape[j], src, j)}
    token_axes = [j for j, d in enumerate(src_val.shape) if any(_same_size(d, key) for key in keys)]
    if not token_axes or not set(token_axes) <= covered:
        return None
    free_src = [d for j, d in enumerate(src_val.shape) if j not in covered]
    free_out = [d for j, d in enumerate(shape) if j not in covered and j != i]
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in free_src + free_out):
        return None
    value = math.prod(free_src) // max(1, math.prod(free_out))
    return value if value * math.prod(free_out) == math.prod(free_src) and value == out.shape[i] else None


_VIEW_OPS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default}


def retarget_token_sizes(gm: fx.GraphModule) -> int:
    """Replace the captured token count (and batch size) in reshape/view/expand sizes by run-time sizes.

    ``torch.export`` records ``reshape(x, [s0, 197, 3, H, D])``; once tokens are dropped that 197 is
    wrong, and once they are packed into ``[1, T, C]`` so is the batch ``s0``. For each such node after
    the first inserted token op, the size is replaced by ``sym_size(input, d)`` where ``d`` is the one
    input axis that had that size at capture; ``view`` becomes ``reshape``. A node where that is ambiguous raises
    :class:`RewriteError` naming it.

    Returns:
        the number of sizes replaced.
    """
    info = get_model_info(gm)
    n0 = info.num_tokens
    n_patch = info.num_patch_tokens
    batch = P.val(info.image_input).shape[0]
    # a head's attention over the stream behind tokens of its own (CaiT's class attention over
    # cat([cls, x])) sizes its keys n0 + those
    pooled = tuple(sorted({int(P.attention_counts(r.attention)[1]) for r in info.head_readers
                           if r.kind == "attn_pool" and r.attention is not None} - {n0, n_patch}))
    from tokenopt.passes.find_blocks import image_dependent_nodes

    # a reshape of a value computed from weights alone (BEiT's relative-position table laid out [N, N, H])
    # keeps the captured sizes: the tables are indexed for the current tokens after it (``pair_gather``)
    data = image_dependent_nodes(gm)
    started, replaced = False, 0
    for node in list(gm.graph.nodes):
        # everything before the first token op still sees the captured token count
        started = started or str(node.meta.get(META_ROLE, "")).startswith("tokens.") or (
            node.meta.get(META_PROVENANCE, {}).get("pass") == "realize_tokens")
        if not started or not P.is_call(node, _VIEW_OPS) or node not in data:
            continue
        if node.target == aten.view.default:
            # attention that now takes a mask may lay its output out differently (its decomposed
            # form does), and a view of that would fail: reshape is a view where one is possible
            node.target = aten.reshape.default
        shape = list(node.args[1])
        src = node.args[0]
        src_val = P.val(src)
        if src_val is None:
            continue
        # the captured sizes that may change: the token count, and the batch once tokens are packed
        keys = ((n0, n_patch, batch) if n_patch != n0 else (n0, batch)) + pooled
        for key in keys:
            hits = [i for i, s in enumerate(shape) if _same_size(s, key)]
            if not hits:
                continue
            dims = [d for d, s in enumerate(src_val.shape) if _same_size(s, key)]
            if (key is batch or key is n_patch or key in pooled) and not dims:
                continue  # a parameter expanded to the image batch (a pooling query), or not token data
            if len(hits) > 1 or len(dims) > 1:
                # [B, N, C] <-> [B, N, 3, H, D] with D == N: the axis that keeps the input's leading axes
                # unchanged in front of it, at the same place, is the token axis itself
                kept = [i for i in hits if i in dims and all(_same_dim(shape[j], src, j) for j in range(i))]
                if len(kept) == 1:
                    hits, dims = kept, kept
            if len(hits) != 1 or len(dims) != 1:
                raise RewriteError(
                    f"cannot tell which size of {node.name} ({node.format_node()}) is {key}: it appears "
                    f"{len(hits)} times in the target shape and {len(dims)} times in the input shape"
                )
            with gm.graph.inserting_before(node):
                size = gm.graph.call_function(aten.sym_size.int, (src, dims[0]))
            stamp(size, block=node.meta.get(META_BLOCK), **{"pass": "retarget_token_sizes"})
            shape[hits[0]] = size
            replaced += 1
        value = None if node.target == aten.expand.default else _static_minus_one(shape, src, P.val(node), keys)
        if value is not None:
            # ``view(x, [B, N, -1, D])`` (Hugging Face's heads): write the -1's captured value, since a
            # -1 cannot be inferred once a buffer has no rows (every token halted, every image
            # skipping a sub-layer)
            shape[shape.index(-1)] = value
        node.update_arg(1, shape)
    gm.meta.setdefault("tokenopt.counters", {})["retarget_token_sizes"] = replaced
    return replaced
