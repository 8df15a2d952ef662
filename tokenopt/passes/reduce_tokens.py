"""Rewrite passes that drop or merge tokens: ATS sampling, top-k selection (EViT) and ToMe merging.

Each pass walks the blocks ``find_blocks`` found, in residual-stream order, and inserts nodes that
call the reference token ops of :mod:`tokenopt.kernels.reference` (the fusion pass may later swap
them for kernels). The per-token state that later blocks need flows through the graph as values:

* ``bias`` ``[B, 1, 1, N]``: added to every later attention's logits through SDPA's ``attn_mask``
  (``-inf`` on ATS padding, ``log(size)`` for ToMe's proportional attention);
* ``valid`` ``[B, N]``: which tokens are real (ATS pads each batch to its largest kept count);
* ``size`` ``[B, N, 1]``: how many patches a ToMe token stands for.

At the end the head is rewired: pooling over tokens becomes a mean over valid tokens (ATS) or a
size-weighted mean (ToMe), and reshapes that had the captured token count baked in are given the
token count of their input at run time (:func:`retarget_token_sizes`).

Writes: provenance (``pass``, ``block``) on every inserted node; ``node.meta[META_ROLE]`` on the
nodes that carry state (``tokens.idx``, ``tokens.valid``, ``tokens.size``, ``tokens.bias``, and
``tokens.select`` on the op returning ``(idx, valid)``, which stays live when ``valid`` is unused);
``gm.meta["tokenopt.counters"][pass_name] = {"blocks": [...], "tokens": {block: count}}`` with the
static token count after each reducing block (``None`` where it is per-image).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import META_BLOCK, META_ROLE, BlockInfo, ModelInfo, stamp
from tokenopt.kernels import reference as ref
from tokenopt.passes import patterns as P
from tokenopt.passes.find_blocks import get_model_info

__all__ = ["RewriteError", "TokenReductionPass", "InsertATS", "InsertTopK", "InsertToMe", "retarget_token_sizes"]

aten = torch.ops.aten


class RewriteError(ValueError):
    """A block cannot be rewritten; the message names the block, the node and what to do."""


@dataclass
class TokenState:
    """Graph values describing the current tokens, threaded from block to block."""

    tokens: Optional[int]  # static token count, None once it is per-image
    bias: Optional[fx.Node] = None
    valid: Optional[fx.Node] = None
    size: Optional[fx.Node] = None
    cu: Optional[fx.Node] = None  # offsets of the packed (ragged) tokens, once they are packed


class _Builder:
    """Inserts call nodes before a fixed anchor, stamping provenance and block on each."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, block: int, pass_name: str):
        self.gm, self.anchor, self.block, self.pass_name = gm, anchor, block, pass_name

    def call(self, target: Callable, *args: Any, role: Optional[str] = None, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, args, kwargs)
        stamp(node, block=self.block, **{"pass": self.pass_name})
        if role:
            node.meta[META_ROLE] = role
        return node

    def unpack(self, node: fx.Node, n: int, roles: Sequence[Optional[str]] = ()) -> list[fx.Node]:
        roles = list(roles) + [None] * (n - len(roles))
        return [self.call(operator.getitem, node, i, role=roles[i]) for i in range(n)]


def _blocks_to_rewrite(info: ModelInfo, blocks: Optional[Sequence[int]], default: Sequence[int], what: str) -> list[int]:
    n = len(info.blocks)
    chosen = list(default) if blocks is None else [b if b >= 0 else n + b for b in blocks]
    bad = [b for b in chosen if not 0 <= b < n]
    if bad:
        raise RewriteError(f"{what}: blocks {bad} do not exist; the model has blocks 0..{n - 1}")
    return sorted(set(chosen))


def _set_attn_bias(blk: BlockInfo, bias: fx.Node) -> None:
    att = blk.attention
    if att.kind != "sdpa":
        raise RewriteError(
            f"block {blk.index} ({blk.module_path}): attention {att.core.name} is a manual chain whose "
            "intermediate results are used elsewhere, so the token bias cannot be added; run "
            "canonicalize_attention first or keep reduction to blocks after it"
        )
    if att.attn_mask is not None:
        raise RewriteError(
            f"block {blk.index} ({blk.module_path}): attention {att.core.name} already takes a mask from "
            "the model, sized for the full token count; token reduction before this block is not supported"
        )
    P.set_sdpa_mask(att.core, bias)


class TokenReductionPass:
    """Base of the reduction passes: walks the blocks, threads :class:`TokenState`, rewires the head.

    Subclasses implement :meth:`reduce_block`.
    """

    pass_name = "reduce_tokens"

    blocks: Optional[Sequence[int]] = None  # subclasses are dataclasses with this as a field

    def reduce_block(self, gm: fx.GraphModule, info: ModelInfo, blk: BlockInfo, state: TokenState) -> None:
        raise NotImplementedError

    def default_blocks(self, depth: int) -> Sequence[int]:
        """Blocks rewritten when ``blocks`` is None."""
        return range(depth)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        info = get_model_info(gm)
        chosen = set(_blocks_to_rewrite(info, self.blocks, self.default_blocks(len(info.blocks)), self.pass_name))
        state = TokenState(tokens=info.num_tokens)
        counts: dict[int, Optional[int]] = {}
        for blk in info.blocks:
            if state.cu is not None and blk.index not in chosen:
                _to_varlen(gm, blk, state.cu, state.cu, self.pass_name)
            elif state.bias is not None:
                _set_attn_bias(blk, state.bias)
            if blk.index in chosen:
                self.reduce_block(gm, info, blk, state)
                counts[blk.index] = state.tokens
        if chosen:
            _rewire_head(gm, info, state, self.pass_name)
            retarget_token_sizes(gm)
        gm.graph.eliminate_dead_code()
        gm.meta.setdefault("tokenopt.counters", {})[self.pass_name] = {"blocks": sorted(chosen), "tokens": counts}
        return PassResult(gm, bool(chosen))

    @staticmethod
    def _require_cls(info: ModelInfo, blk: BlockInfo, policy: str) -> None:
        if info.num_prefix_tokens < 1:
            raise RewriteError(
                f"{policy} scores tokens by the CLS token's attention, but this model has no prefix "
                f"token (its head reads {', '.join(r.kind for r in info.head_readers)}); "
                "use policy='tome', which needs none"
            )

    @staticmethod
    def _replace_uses_after(node: fx.Node, new: fx.Node, inserted: set) -> None:
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inserted)


@dataclass
class InsertATS(TokenReductionPass):
    """ATS inside the attention of each chosen block: score, sample, keep only the sampled queries.

    The full softmax over all keys stays in the fused SDPA; the CLS row is computed separately as
    ``q_cls . K^T`` (:func:`~tokenopt.kernels.reference.cls_attention`). The queries, the residual
    input and everything after attention keep only the sampled tokens. Three ways to hold per-image
    counts (``mode``):

    * ``"ragged"``: from the first sampling block on, all kept tokens of the batch live in one packed
      ``[1, T, C]`` buffer with offsets ``cu``; attention runs per image over its own tokens
      (:func:`~tokenopt.kernels.reference.varlen_attention`) and the head unpacks;
    * ``"padded"``: each batch is padded to its largest kept count, padding masked out of attention
      and pooling;
    * ``"masked"``: nothing is removed, dropped tokens are only masked (what the published code does;
      no speedup, kept for comparison).

    Args:
        blocks: block indices to sample in.
        max_tokens: K, the most patch tokens an image keeps in a block: a count, or a share of the
            model's patch tokens (a float in (0, 1]).
        min_tokens: floor of kept patch tokens per image.
        mode: ``"ragged"``, ``"padded"`` or ``"masked"``.
    """

    blocks: Optional[Sequence[int]] = None
    max_tokens: Union[int, float] = 0.5
    min_tokens: int = 8
    mode: str = "ragged"
    pass_name = "insert_ats"

    def default_blocks(self, depth):
        return range(3, depth)  # ATS samples in blocks 4..12 of DeiT

    def reduce_block(self, gm, info, blk, state):
        self._require_cls(info, blk, "ATS")
        att = blk.attention
        if att.kind != "sdpa":
            raise RewriteError(f"block {blk.index}: ATS needs the attention as one SDPA node; run canonicalize_attention")
        b = _Builder(gm, att.core, blk.index, self.pass_name)
        p = info.num_prefix_tokens
        k = self.max_tokens if isinstance(self.max_tokens, int) else math.ceil(self.max_tokens * info.num_patch_tokens)
        dtype = P.val(blk.x_in).dtype
        if state.cu is None:
            valid_in = state.valid
            cls = b.call(ref.cls_attention, att.q, att.k, att.scale, state.bias, role="tokens.cls_attn")
            scores = b.call(ref.ats_scores, cls, att.v, p, valid_in, role="tokens.score")
        else:  # packed input: CLS rows and value norms straight from the packed q/k/v, padded [B, M]
            packed = b.call(ref.packed_cls_scores, att.q, att.k, att.v, state.cu, att.scale)
            cls, vnorm, valid_in = b.unpack(packed, 3, roles=("tokens.cls_attn", None, None))
            scores = b.call(ref.ats_scores_from_norms, cls, vnorm, p, valid_in, role="tokens.score")
        sel = b.call(ref.ats_select, scores, k, self.min_tokens, p, valid_in, role="tokens.select")
        idx, valid = b.unpack(sel, 2, roles=("tokens.idx", "tokens.valid"))
        state.tokens = None
        b2 = _Builder(gm, blk.attn_add, blk.index, self.pass_name)
        if self.mode == "masked":
            keep = b2.call(ref.scatter_keep, idx, valid, info.num_tokens, role="tokens.keep")
            state.valid = keep
            state.bias = b2.call(ref.valid_to_bias, keep, dtype, role="tokens.bias")
            return
        if self.mode == "padded":
            att.core.update_arg(0, b.call(ref.gather_tokens, att.q, idx, 2))
            x_sel = b2.call(ref.gather_tokens, blk.x_in, idx, 1)
            blk.attn_add.replace_input_with(blk.x_in, x_sel)
            state.bias = b2.call(ref.valid_to_bias, valid, dtype, role="tokens.bias")
            state.valid = valid
            return
        flat, cu = b.unpack(b.call(ref.packed_index, idx, valid, state.cu, att.q), 2, roles=("tokens.flat", "tokens.cu"))
        q_sel = b.call(ref.gather_packed, att.q, flat)
        _to_varlen(gm, blk, cu, state.cu, self.pass_name, q=q_sel)
        x_sel = b2.call(ref.gather_packed, blk.x_in, flat)
        blk.attn_add.replace_input_with(blk.x_in, x_sel)
        state.cu, state.bias, state.valid = cu, None, None


def _to_varlen(gm: fx.GraphModule, blk: BlockInfo, cu_q: fx.Node, cu_k: Optional[fx.Node], pass_name: str,
               q: Optional[fx.Node] = None) -> None:
    """Replace the block's SDPA by attention over packed tokens, each image attending to its own."""
    att = blk.attention
    if att.kind != "sdpa" or att.attn_mask is not None:
        raise RewriteError(
            f"block {blk.index} ({blk.module_path}): attention {att.core.name} is not a plain SDPA without a "
            "model mask, so it cannot run over packed tokens; use mode='padded'"
        )
    b = _Builder(gm, att.core, blk.index, pass_name)
    new = b.call(ref.varlen_attention, q if q is not None else att.q, att.k, att.v, cu_q, cu_k, att.scale,
                 role="attn.core")
    new.meta["val"] = att.core.meta.get("val")
    att.core.replace_all_uses_with(new)
    gm.graph.erase_node(att.core)
    att.core = new
    att.kind = "varlen"


@dataclass
class InsertTopK(TokenReductionPass):
    """EViT-style top-k between attention and MLP: keep ``ceil(rate * patches)`` by head-averaged CLS
    attention, optionally fusing the dropped tokens into one extra token.

    Args:
        blocks: block indices to prune after.
        keep_rate: share of the current patch tokens kept at each chosen block.
        fuse: append EViT's fused token (dropped tokens weighted by their CLS attention).
    """

    blocks: Optional[Sequence[int]] = None
    keep_rate: float = 0.7
    fuse: bool = False
    pass_name = "insert_topk"

    def default_blocks(self, depth):
        return range(3, depth, 3)  # EViT prunes at blocks 4, 7, 10 of DeiT

    def reduce_block(self, gm, info, blk, state):
        self._require_cls(info, blk, "top-k")
        att = blk.attention
        p = info.num_prefix_tokens
        patches = state.tokens - p
        keep = min(patches, math.ceil(self.keep_rate * patches))
        b = _Builder(gm, blk.attn_add.next, blk.index, self.pass_name)
        cls = b.call(ref.cls_attention, att.q, att.k, att.scale, state.bias, role="tokens.cls_attn")
        idx = b.call(ref.topk_select, cls, keep, p, role="tokens.idx")
        x_new = b.call(ref.gather_tokens, blk.attn_add, idx, 1)
        inserted = {cls, idx, x_new}
        if self.fuse and keep < patches:
            fused = b.call(ref.evit_fuse, blk.attn_add, cls, idx, p)
            x_new = b.call(aten.cat.default, [x_new, fused], 1)
            inserted |= {fused, x_new}
            keep += 1
        self._replace_uses_after(blk.attn_add, x_new, inserted)
        state.tokens = p + keep


@dataclass
class InsertToMe(TokenReductionPass):
    """ToMe between attention and MLP: merge ``r`` token pairs per block by bipartite soft matching on
    the head-averaged keys, size-weighted; ``log(size)`` biases later attention (proportional
    attention) and pooling heads weight by size.

    Args:
        blocks: block indices to merge in.
        r: tokens merged per block: one count for every chosen block, or one per model block.
        proportional_attention: add ``log(size)`` to the attention logits.
    """

    blocks: Optional[Sequence[int]] = None
    r: Union[int, Sequence[int]] = 13
    proportional_attention: bool = True
    pass_name = "insert_tome"

    def reduce_block(self, gm, info, blk, state):
        if isinstance(self.r, int):
            r = self.r
        elif len(self.r) == len(info.blocks):
            r = self.r[blk.index]
        else:
            raise RewriteError(f"ToMe r lists {len(self.r)} values but the model has {len(info.blocks)} blocks; "
                               "give one value per block or a single int")
        if r <= 0:
            return
        att = blk.attention
        p = info.num_prefix_tokens
        b = _Builder(gm, blk.attn_add.next, blk.index, self.pass_name)
        metric = b.call(aten.mean.dim, att.k, [1], role="tokens.metric")
        match = b.call(ref.tome_match, metric, r, p, role="tokens.match")
        unm, src, dst = b.unpack(match, 3)
        merged = b.call(ref.tome_merge, blk.attn_add, state.size, unm, src, dst, p)
        x_new, size = b.unpack(merged, 2, roles=(None, "tokens.size"))
        inserted = {metric, match, unm, src, dst, merged, x_new, size}
        self._replace_uses_after(blk.attn_add, x_new, inserted)
        if self.proportional_attention:
            state.bias = b.call(ref.size_to_bias, size, role="tokens.bias")
        state.size = size
        patches = state.tokens - p
        state.tokens -= min(r, (patches + 1) // 2)


def _rewire_head(gm: fx.GraphModule, info: ModelInfo, state: TokenState, pass_name: str) -> None:
    """Make the head read the reduced tokens as it read the full ones."""
    for reader in info.head_readers:
        if reader.kind == "token":
            if reader.index >= info.num_prefix_tokens:
                raise RewriteError(
                    f"the head reads token {reader.index} (node {reader.node.name}), a patch token that token "
                    "reduction may drop or move; only prefix tokens (CLS, distillation, registers) are kept in place"
                )
            if state.cu is not None:  # packed: token i of every image
                b = _Builder(gm, reader.node, -1, pass_name)
                new = b.call(ref.packed_first, reader.node.args[0], state.cu, reader.index)
                reader.node.replace_all_uses_with(new)
            continue
        if reader.kind == "mean":
            if state.valid is None and state.size is None and state.cu is None:
                continue  # a plain mean over the remaining tokens is what the model asked for
            mean = reader.node
            src = mean.args[0]
            tokens = src.args[0] if P.is_call(src, P.SLICE_OPS) else src
            b = _Builder(gm, mean, -1, pass_name)
            if state.cu is not None:
                new = b.call(ref.packed_mean, tokens, state.cu, reader.start, reader.end)
            elif state.size is not None:
                new = b.call(ref.sized_mean, tokens, state.size, reader.start, reader.end)
            else:
                new = b.call(ref.masked_mean, tokens, state.valid, reader.start, reader.end)
            mean.replace_all_uses_with(new)
            continue
        raise RewriteError(
            f"after the last block the model uses every token (node {reader.node.name}, "
            f"{reader.kind}); token reduction would change that output's shape. Reduce tokens only in "
            "models whose head reads prefix tokens or pools over tokens"
        )


def _same_size(size: Any, key: Any) -> bool:
    """``size`` (an int, or a node / SymInt for a symbolic size) is the captured size ``key``."""
    if isinstance(size, fx.Node):
        size = size.meta.get("val")
    if isinstance(key, int):
        return isinstance(size, int) and not isinstance(size, bool) and size == key
    return isinstance(size, torch.SymInt) and str(size) == str(key)


_VIEW_OPS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default}


def retarget_token_sizes(gm: fx.GraphModule) -> int:
    """Replace the captured token count (and batch size) in reshape/view/expand sizes by run-time sizes.

    ``torch.export`` records ``reshape(x, [s0, 197, 3, H, D])``; once tokens are dropped that 197 is
    wrong, and once they are packed into ``[1, T, C]`` so is the batch ``s0``. For each such node after
    the first inserted token op, the size is replaced by ``sym_size(input, d)`` where ``d`` is the one
    input axis that had that size at capture. A node where that is ambiguous raises
    :class:`RewriteError` naming it.

    Returns:
        the number of sizes replaced.
    """
    info = get_model_info(gm)
    n0 = info.num_tokens
    batch = P.val(info.image_input).shape[0]
    started, replaced = False, 0
    for node in list(gm.graph.nodes):
        # everything before the first token op still sees the captured token count
        started = started or str(node.meta.get(META_ROLE, "")).startswith("tokens.")
        if not started or not P.is_call(node, _VIEW_OPS):
            continue
        shape = list(node.args[1])
        src = node.args[0]
        src_val = P.val(src)
        if src_val is None:
            continue
        # the captured sizes that may change: the token count, and the batch once tokens are packed
        for key in (n0, batch):
            hits = [i for i, s in enumerate(shape) if _same_size(s, key)]
            if not hits:
                continue
            dims = [d for d, s in enumerate(src_val.shape) if _same_size(s, key)]
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
        node.update_arg(1, shape)
    gm.meta.setdefault("tokenopt.counters", {})["retarget_token_sizes"] = replaced
    return replaced
