"""The facts passes share: typed block descriptions and the ``node.meta`` keys that carry them.

tokenopt's IR is the ATen-level ``torch.fx`` graph that :func:`torch.export.export` produces (see
``docs/ARCHITECTURE.md`` for why). Analysis passes write what they find into ``node.meta`` under the
keys below and into ``gm.meta[MODEL_INFO]``; rewrite passes read them and stamp provenance on every
node they create.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

__all__ = [
    "META_BLOCK",
    "META_ROLE",
    "META_PROVENANCE",
    "MODEL_INFO",
    "AttentionInfo",
    "MLPInfo",
    "BlockInfo",
    "HeadReader",
    "ModelInfo",
    "node_shape",
    "stamp",
]

# node.meta keys written by tokenopt.
META_BLOCK = "tokenopt.block"  # int: index of the transformer block the node belongs to
META_ROLE = "tokenopt.role"  # str: what the node is within its block ("attn.q", "mlp.fc1", ...)
META_PROVENANCE = "tokenopt.provenance"  # dict: {"pass", "policy", "block"} for inserted nodes
# gm.meta key holding the ModelInfo written by find_blocks.
MODEL_INFO = "tokenopt.model_info"


@dataclass
class AttentionInfo:
    """One attention core: ``softmax(q k^T * scale + mask) v`` on ``[batch, heads, tokens, head_dim]``.

    Attributes:
        kind: ``"sdpa"`` (an ``aten.scaled_dot_product_attention`` node) or ``"manual"`` (a
            matmul -> softmax -> matmul chain).
        core: the SDPA node, or the second matmul of the manual chain (its output is the attention
            result either way).
        q, k, v: nodes producing the query, key and value tensors as attention consumes them (after
            any qk-norm), ``[B, H, N, D]``.
        num_heads, head_dim: read from the shape of ``q``.
        scale: softmax temperature applied to ``q k^T``.
        softmax: the softmax node of a manual chain (``None`` for SDPA).
        attn_mask: node of an additive or boolean mask the model passes itself, if any.
        proj: the output projection (first ``linear`` after the core), if any.
        head_mix: the heads are mixed by learned maps before and/or after the softmax (talking-heads
            attention, DeepViT's re-attention): a manual chain SDPA cannot express.
    """

    kind: str
    core: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    num_heads: int
    head_dim: int
    scale: float
    softmax: Optional[fx.Node] = None
    attn_mask: Optional[fx.Node] = None
    proj: Optional[fx.Node] = None
    qkv_linears: list[fx.Node] = field(default_factory=list)
    matmul_qk: Optional[fx.Node] = None
    head_mix: bool = False


@dataclass
class MLPInfo:
    """The feed-forward branch of a block: its linears in order and the activations between them."""

    linears: list[fx.Node]
    activations: list[fx.Node]


@dataclass
class BlockInfo:
    """One pre-norm transformer block ``x_mid = x_in + attn(...)``; ``x_out = x_mid + mlp(...)``.

    Attributes:
        index: position of the block in the residual stream, from 0.
        x_in, x_mid, x_out: residual-stream nodes ``[B, N, C]`` entering the block, after the attention
            residual add, and after the MLP residual add.
        attn_add, mlp_add: the two residual ``add`` nodes (``x_mid`` is ``attn_add``).
        attn_branch, mlp_branch: the operand of each residual add that is not the skip connection.
        norm1, norm2: the first normalisation on each branch, if the model has one as a single op.
        layer_scale1, layer_scale2: the ``mul`` by a learned per-channel vector just before each
            residual add (LayerScale), if present.
        tokens: token count at capture time; ``channels``: width of the residual stream.
        module_path: the ``nn.Module`` path recorded by export for the block (for messages only; it
            is never used to find anything).
    """

    index: int
    x_in: fx.Node
    x_mid: fx.Node
    x_out: fx.Node
    attn_add: fx.Node
    mlp_add: fx.Node
    attn_branch: fx.Node
    mlp_branch: fx.Node
    attention: AttentionInfo
    mlp: MLPInfo
    norm1: Optional[fx.Node]
    norm2: Optional[fx.Node]
    layer_scale1: Optional[fx.Node]
    layer_scale2: Optional[fx.Node]
    tokens: int
    channels: int
    module_path: str = ""
    nodes: list[fx.Node] = field(default_factory=list, repr=False)


@dataclass
class HeadReader:
    """How the model's head reads the token sequence after the last block.

    ``kind`` is ``"token"`` (one token, ``index``), ``"mean"`` (mean over ``start:end``),
    ``"attn_pool"`` (a learned query attends to every token, as SigLIP's MAP head: ``attention``
    describes that attention, ``node`` is its core), ``"tokens"`` (the whole sequence is returned or
    used as is) or ``"other"``.
    """

    kind: str
    node: fx.Node
    index: Optional[int] = None
    start: int = 0
    end: Optional[int] = None
    attention: Optional["AttentionInfo"] = None


@dataclass
class ModelInfo:
    """Model-level facts found by ``find_blocks``.

    Attributes:
        blocks: the transformer blocks in residual-stream order.
        token_axis: axis of the token dimension in the residual stream (``1`` for ``[B, N, C]``).
        num_prefix_tokens: tokens before the patch tokens (CLS, distillation, registers), read from
            the concatenation that builds the sequence.
        num_patch_tokens: tokens that come from the image.
        head_readers: how the head reads the tokens after the last block.
        image_input: the placeholder holding the image batch.
        num_suffix_tokens: tokens after the patch tokens that do not come from the image (YOLOS's
            detection tokens); counted among ``num_patch_tokens``. Reductions refuse such models.
    """

    blocks: list[BlockInfo]
    token_axis: int
    num_prefix_tokens: int
    num_patch_tokens: int
    head_readers: list[HeadReader]
    image_input: fx.Node
    prefix_cat: Optional[fx.Node] = None
    num_suffix_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patch_tokens

    def summary(self) -> dict[str, Any]:
        """Plain-data view (ints and strings), for printing, JSON and tests."""
        return {
            "blocks": len(self.blocks),
            "prefix_tokens": self.num_prefix_tokens,
            "patch_tokens": self.num_patch_tokens,
            "token_axis": self.token_axis,
            "heads": [b.attention.num_heads for b in self.blocks],
            "attention": sorted({b.attention.kind for b in self.blocks}),
            "layer_scale": any(b.layer_scale1 is not None for b in self.blocks),
            "head_readers": [
                dataclasses.replace(r, node=None, attention=None).__dict__ | {"node": r.node.name}
                for r in self.head_readers
            ],
        }


def node_shape(node: Any) -> Optional[tuple]:
    """Shape of a node's value as recorded at capture time (symbolic sizes stay symbolic)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    return None


def stamp(node: fx.Node, **provenance: Any) -> fx.Node:
    """Merge ``provenance`` into ``node.meta[META_PROVENANCE]`` and return the node."""
    node.meta.setdefault(META_PROVENANCE, {}).update(provenance)
    if "block" in provenance and provenance["block"] is not None:
        node.meta.setdefault(META_BLOCK, provenance["block"])
    return node


# --- the decision vocabulary ------------------------------------------------------------------------
# A policy pass only decides; tokenopt.passes.realize executes. A decision is a small record of graph
# nodes (inserted by the policy) in one of these forms, for one block and one site of that block:
#   site "pre_block": on the block's input, before anything of the block runs (AdaViT's gates);
#   site "attn":      inside attention: only the chosen tokens go on as queries (ATS);
#   site "post_attn": after the attention residual, before the MLP (top-k, EViT, ToMe);
#   site "post_block": on the block's output, before the next block (A-ViT halting, DynamicViT).

META_PLAN = "tokenopt.plan"  # gm.meta key: list[PlannedDecision], filled by the policy passes
SITES = ("pre_block", "attn", "post_attn", "post_block")


@dataclass
class Keep:
    """Keep tokens ``idx`` ``[B, width]`` (indices into the current tokens of each image, prefix tokens
    first). ``valid`` ``[B, width]`` marks real entries when the count varies per image (``None``: all
    ``width`` are kept); valid entries form a prefix of each row. ``extra`` ``[B, E, C]``: tokens the
    policy built and appends (EViT's fused token); post-attention site only."""

    idx: fx.Node
    width: int
    valid: Optional[fx.Node] = None
    extra: Optional[fx.Node] = None
    extra_count: int = 0


@dataclass
class Merge:
    """Merge tokens: token ``j`` of an image goes to slot ``slot[:, j]`` (``-1``: dropped) of
    ``num_slots`` slots; a slot is the size-weighted mean of its tokens and its size their sum.
    ``proportional``: later attention adds ``log(size)`` to the logits (ToMe's proportional attention).
    ``rep``: which token stands for its slot (its original position indexes rotary and relative-position
    tables afterwards); needed only on models that have such tables."""

    slot: fx.Node
    num_slots: int
    proportional: bool = True
    rep: Optional[fx.Node] = None  # [B, N] bool: the token whose position a slot keeps (side tables)


@dataclass
class Halt:
    """Adaptive halting (A-ViT): ``score`` in [0, 1] for every current token (rows laid out as the
    residual stream: ``[B, L]`` dense, ``[1, T]`` packed), decided on the block's output. Scores
    accumulate per token; a token whose cumulative score passes ``1 - eps`` halts: it adds its remainder
    times its state to its output and leaves (packed) or is masked out (masked); a running token adds
    ``score`` times its state. ``last``: every running token halts here (its score counts as 1). The head
    reads the accumulated outputs. Realised by ``tokenopt::act_step`` (masked) or ``tokenopt::halt_pack`` (packed)."""

    score: fx.Node
    eps: float = 0.01
    last: bool = False


@dataclass
class Mask:
    """The training form of a learned Keep (DynamicViT): ``keep`` ``[B, L]`` in [0, 1] (1 for prefix
    tokens; a hard 0/1 sample with a straight-through gradient) weighs every current token as a key in
    each later attention, where every query still sees itself (DynamicViT's ``softmax_with_policy``).
    Nothing moves: realised in the masked form only (``tokenopt::policy_attention``); the same policy's
    inference graph returns a :class:`Keep`."""

    keep: fx.Node


@dataclass
class Gate:
    """Which parts of one block each image runs (AdaViT), decided on the block's input (site
    ``"pre_block"``): ``heads [B, H]`` (the attention heads), ``attn [B]`` and ``mlp [B]`` (the two
    residual sub-layers); ``None``: that part always runs. Training form: straight-through 0/1 floats that
    scale each part's output (masked: the work is done, then weighed). Inference form: bools; padded and
    packed graphs do not compute a skipped part for that image (the images that run a sub-layer are
    gathered, run and added back: ``tokenopt::gate_rows``; attention runs only the (image, head) pairs
    that are on: ``tokenopt::head_attention``)."""

    heads: Optional[fx.Node] = None
    attn: Optional[fx.Node] = None
    mlp: Optional[fx.Node] = None


@dataclass
class PlannedDecision:
    """One entry of the plan: ``decide(ctx)`` is called by the realisation pass with a
    :class:`tokenopt.passes.realize.DecisionContext` for ``block`` at ``site`` and returns a
    :class:`Keep`, a :class:`Merge`, a :class:`Halt`, a :class:`Mask`, a :class:`Gate` or None."""

    block: int
    site: str
    policy: str
    decide: Any
    adaptive: bool = False
