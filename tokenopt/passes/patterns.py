"""Op vocabularies and small graph predicates shared by the analysis and rewrite passes.

Everything here matches ATen targets as ``torch.export`` emits them; nothing looks at module classes
or attribute names.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

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
    aten.dropout_.default,  # F.dropout(..., inplace=True), off in eval (hand-written ViTs, older code)
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
EINSUM_OPS = {aten.einsum.default}
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


# -- attention patterns ----------------------------------------------------------------------------
#
# A manual attention core is ``output(probs(softmax(scale(scores(q, k)) [+ mask])), v)``. ``find_blocks``
# walks up from each softmax to a *scores* node and down to an *output* node; each way models write
# those two nodes is one entry below (matched in order, first match wins). Between softmax and output
# only ``IDENTITY_OPS`` may stand (dropout, dtype casts); users of the softmax whose results are never
# used (dead code export keeps) do not count.


@dataclass(frozen=True)
class Scores:
    """What a scores pattern read from ``q k^T``: the query ``[..., N, D]`` and the keys.

    ``k`` is the keys as ``[..., N, D]`` when the graph holds them so; else ``k`` is the node that
    ``permute(k, k_perm)`` turns into ``[..., N, D]`` (``canonicalize_attention`` inserts that permute).
    """

    q: fx.Node
    k: fx.Node
    k_perm: Optional[tuple] = None


@dataclass(frozen=True)
class AttentionPattern:
    """One way a model writes the scores or the output of attention: a name, the model families that
    need it (documentation and test ids), the ATen ops it starts from, and the check that reads it."""

    name: str
    used_by: str
    ops: frozenset
    read: Callable[[fx.Node], Any]


def _einsum_parts(node: fx.Node) -> Optional[tuple[str, str, str, str, list]]:
    """``einsum("<p>ab,<p>cd-><p>ef", x, y)`` -> (p, "ab", "cd", "ef", [x, y]) for two 2-letter tails."""
    eq, ops = node.args[0], node.args[1]
    if not isinstance(eq, str) or "->" not in eq or len(ops) != 2:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    if lhs.count(",") != 1:
        return None
    a, b = lhs.split(",")
    if min(len(a), len(b), len(out)) < 2 or not (a[:-2] == b[:-2] == out[:-2]):
        return None
    return a[:-2], a[-2:], b[-2:], out[-2:], list(ops)


def _scores_matmul_transposed(node: fx.Node) -> Optional[Scores]:
    q, kt = node.args[:2]
    if is_call(kt, TRANSPOSE_OPS) and swaps_last_two(kt):
        return Scores(q, kt.args[0])
    return None


def _scores_matmul_permuted(node: fx.Node) -> Optional[Scores]:
    q, kt = node.args[:2]
    if not (is_call(kt, {aten.permute.default}) and rank(kt) == rank(q) >= 3):
        return None
    nd = rank(kt)
    perm = [norm_dim(p, nd) for p in kt.args[1]]
    k_perm = tuple(perm[:-2] + [perm[-1], perm[-2]])  # permute(k, k_perm) is kt with its last two swapped
    if k_perm == tuple(range(nd)):
        return None  # a plain swap of the last two: the pattern above
    return Scores(q, kt.args[0], k_perm)


def _scores_einsum(node: fx.Node) -> Optional[Scores]:
    parts = _einsum_parts(node)
    if parts is None:
        return None
    _p, (i, d), kk, (i2, j), (q, k) = parts
    if len({i, d, j}) != 3 or i2 != i:
        return None
    if kk == j + d:  # "...id,...jd->...ij": keys as [..., N, D]
        return Scores(q, k)
    if kk == d + j:  # "...id,...dj->...ij": keys already transposed
        nd = rank(k)
        return Scores(q, k, tuple(range(nd - 2)) + (nd - 1, nd - 2))
    return None


SCORE_PATTERNS = (
    # q @ k.transpose(-2, -1) (or a permute swapping the last two): timm Attention with
    # fused_attn=False, Hugging Face "eager" attention, vit-pytorch ViT; as bmm on [B*H, N, D]:
    # nn.MultiheadAttention with need_weights=True (CLIP, open_clip)
    AttentionPattern("matmul(q, k^T)", "timm (fused_attn=False), Hugging Face eager, vit-pytorch, "
                     "nn.MultiheadAttention", frozenset(MATMUL_OPS), _scores_matmul_transposed),
    # q @ k.permute(0, 2, 3, 1): keys split as [B, N, H, D] and laid out [B, H, D, N] in one permute
    # (hand-written ViTs)
    AttentionPattern("matmul(q, permute(k))", "hand-written ViTs", frozenset(MATMUL_OPS),
                     _scores_matmul_permuted),
    # einsum("b h i d, b h j d -> b h i j", q, k): vit-pytorch's CaiT, CrossViT, DeepViT and other
    # einops-style code
    AttentionPattern("einsum(q, k)", "vit-pytorch (CaiT, CrossViT, DeepViT, ...)", frozenset(EINSUM_OPS),
                     _scores_einsum),
)


def _output_matmul(node: fx.Node, probs: fx.Node) -> Optional[fx.Node]:
    return node.args[1] if node.args[0] is probs else None


def _output_einsum(node: fx.Node, probs: fx.Node) -> Optional[fx.Node]:
    parts = _einsum_parts(node)
    if parts is None:
        return None
    _p, (i, j), (j2, d), out, (a, v) = parts
    return v if a is probs and j2 == j and out == i + d and len({i, j, d}) == 3 else None


OUTPUT_PATTERNS = (
    # probs @ v: timm, Hugging Face, vit-pytorch ViT; bmm: nn.MultiheadAttention
    AttentionPattern("matmul(probs, v)", "timm, Hugging Face, vit-pytorch, nn.MultiheadAttention",
                     frozenset(MATMUL_OPS), _output_matmul),
    # einsum("b h i j, b h j d -> b h i d", probs, v): vit-pytorch's einops-style attention
    AttentionPattern("einsum(probs, v)", "vit-pytorch (CaiT, CrossViT, DeepViT, ...)", frozenset(EINSUM_OPS),
                     _output_einsum),
)


def match_scores(node: Any) -> Optional[tuple[AttentionPattern, Scores]]:
    """The first of ``SCORE_PATTERNS`` that reads ``node`` as ``q k^T``, with what it read."""
    for pat in SCORE_PATTERNS:
        if is_call(node, pat.ops):
            found = pat.read(node)
            if found is not None:
                return pat, found
    return None


def match_output(node: Any, probs: fx.Node) -> Optional[tuple[AttentionPattern, fx.Node]]:
    """The first of ``OUTPUT_PATTERNS`` that reads ``node`` as ``probs @ v``, with ``v``."""
    for pat in OUTPUT_PATTERNS:
        if is_call(node, pat.ops):
            v = pat.read(node, probs)
            if isinstance(v, fx.Node):
                return pat, v
    return None


# -- head mixing around the softmax ----------------------------------------------------------------------
#
# Talking-heads attention (Shazeer et al. 2020; timm's CaiT ``TalkingHeadAttn``) mixes the heads of the
# logits and of the probabilities with learned [H, H] maps, and DeepViT's re-attention mixes the
# probabilities (then LayerNorms over the heads). Each map acts on the head axis only, at every
# (query, key) pair, so it commutes with choosing, merging or padding tokens the way the softmax does.
# Such an op stands between scores and softmax, or softmax and output; ``head_mix_input`` reads one step
# and ``head_mix_labels`` checks a whole chain axis by axis.

HEAD_MIX_OPS = {aten.permute.default, aten.transpose.int, aten.linear.default, aten.layer_norm.default,
                aten.einsum.default}


def head_mix_input(node: Any) -> Optional[fx.Node]:
    """The attention-map operand of ``node`` when it may be one step of a head mixing (a permute, a
    linear or LayerNorm, or an einsum with one weight operand), else None. ``head_mix_labels`` then
    checks that the chain really acts on the head axis only."""
    if not is_call(node, HEAD_MIX_OPS):
        return None
    if is_call(node, EINSUM_OPS):
        ops = node.args[1]
        if len(ops) != 2 or not is_param(ops[1]) or rank(ops[1]) != 2:
            return None
        return ops[0]
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def head_mix_labels(chain: list[fx.Node], start: fx.Node, heads: int) -> Optional[tuple]:
    """Follow the axes ``(b, h, i, j)`` of the ``[B, H, N, M]`` map ``start`` through ``chain`` (its
    nodes in order, each reading the previous one). Returns the axes of the last node's result, or None
    when a step acts on anything but the head axis (a linear or norm over tokens, say)."""
    labels = ["b", "h", "i", "j"]
    for node in chain:
        if is_call(node, {aten.permute.default}):
            labels = [labels[norm_dim(d, 4)] for d in node.args[1]]
        elif is_call(node, {aten.transpose.int}):
            a, b = norm_dim(node.args[1], 4), norm_dim(node.args[2], 4)
            labels[a], labels[b] = labels[b], labels[a]
        elif is_call(node, LINEAR_OPS):
            w = val(node.args[1])
            if labels[-1] != "h" or w is None or tuple(w.shape) != (heads, heads):
                return None
        elif is_call(node, NORM_OPS):
            if labels[-1] != "h" or list(node.args[1]) != [heads]:
                return None
        elif is_call(node, EINSUM_OPS):
            lhs, out = node.args[0].replace(" ", "").split("->")
            a, w = lhs.split(",")
            if len(a) != 4 or len(w) != 2 or len(out) != 4 or w[0] != a[labels.index("h")]:
                return None
            names = {letter: lab for letter, lab in zip(a, labels)}
            names[w[1]] = "h"
            if w[0] in out or any(letter not in names for letter in out):
                return None
            labels = [names[letter] for letter in out]
        elif not is_call(node, IDENTITY_OPS | MUL_OPS | DIV_OPS | ADD_OPS | SOFTMAX_OPS):
            return None
    return tuple(labels)


def attention_counts(att) -> tuple[Any, Any]:
    """(queries, keys) of an attention core (an ``AttentionInfo``), read from its scores: a manual
    chain may hold its keys in another layout, so its ``q k^T`` node is read there."""
    if att.kind == "manual":
        return tuple(val(att.matmul_qk).shape[-2:])
    return val(att.q).shape[-2], val(att.k).shape[-2]


def scores_input(node: fx.Node) -> Any:
    """The logits operand of an attention output node (``probs`` of ``probs @ v``)."""
    return node.args[1][0] if is_call(node, EINSUM_OPS) else node.args[0]


# metadata checks export leaves on a value (``x.to(dtype)`` in Hugging Face's eager attention): they
# read no values, so they do not make a node "used"
ASSERT_OPS = {aten._assert_tensor_metadata.default}


def is_dead(node: fx.Node) -> bool:
    """Whether nothing ``node`` computes is ever used: no users, or only dead ones, and no side effects
    (``nn.MultiheadAttention`` averages its attention weights even when the caller drops them)."""
    if node.op == "call_function" and node.target in ASSERT_OPS:
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    return all(is_dead(u) for u in node.users)


def live_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_dead(u)]


def record(gm: fx.GraphModule, nodes, *inputs) -> dict[fx.Node, Any]:
    """Run ``gm`` on ``inputs`` (no grad) and return the values the ``nodes`` of its graph took."""
    wanted, seen = set(nodes), {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return seen
