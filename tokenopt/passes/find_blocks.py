"""Analysis pass: find the transformer blocks of a captured ViT by graph pattern.

A block is recognised by what it computes, never by what its modules are called:

1. An *attention core* is an ``aten.scaled_dot_product_attention`` node, or a chain
   ``matmul(q, k^T) [* scale] -> softmax(-1) [-> dropout] -> matmul(., v)``.
2. A *residual add* is ``add(a, b)`` where one operand is an ancestor of the other (``a`` is the skip
   connection, ``b`` the branch) and both have the residual stream's ``[B, N, C]`` shape.
3. The attention residual of a core is the first residual add whose branch depends on the core while
   its skip does not; the MLP residual is the next residual add whose branch holds linears and no
   attention core. ``x_in -> attn_add -> mlp_add`` is one block.

The data-flow graph used for ancestry is a ``networkx.DiGraph`` over the nodes that depend on the
image input (weights are left out, so they do not create spurious paths).

Writes:
    ``gm.meta[MODEL_INFO]``: :class:`~tokenopt.ir.ModelInfo`;
    ``node.meta[META_BLOCK]`` and ``node.meta[META_ROLE]`` on every node inside a block.
"""

from __future__ import annotations

import math
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import (
    META_BLOCK,
    META_ROLE,
    MODEL_INFO,
    AttentionInfo,
    BlockInfo,
    HeadReader,
    MLPInfo,
    ModelInfo,
)
from tokenopt.passes import patterns as P

__all__ = ["NoAttentionError", "BlockStructureError", "BlocksNotRecognisedWarning", "find_blocks", "get_model_info"]

# what every refusal of find_blocks ends with: the way to run the model anyway, and what reductions need
_FIX = ("policy='none' runs the model as captured (equal to it, no reduction); reductions need blocks "
        "x = x + attn(norm(x)); x = x + mlp(norm(x)) on a [B, N, C] token stream, with attention as "
        "F.scaled_dot_product_attention(q, k, v) or softmax(q @ k.transpose(-2, -1) * scale) @ v on "
        "[B, heads, N, head_dim] tensors (timm's Attention is one)")


class NoAttentionError(ValueError):
    """The graph holds no attention block tokenopt can rewrite.

    Attributes:
        unrecognised: module paths of softmax nodes that look like attention written in a form no
            pattern matches (empty for a model with no softmax at all: a CNN or an MLP).
    """

    user_error = True  # the pipeline passes it on as it is: it already names the model part and the fix

    def __init__(self, message: str, unrecognised: tuple = ()):
        super().__init__(message)
        self.unrecognised = tuple(unrecognised)


class BlockStructureError(ValueError):
    """Attention was found but the blocks around it do not have the residual structure expected."""

    user_error = True  # the pipeline passes it on as it is: it already names the model part and the fix


class BlocksNotRecognisedWarning(UserWarning):
    """``optimize(policy="none")`` on a model whose blocks find_blocks cannot describe: the captured graph
    is returned unchanged (it equals the model) and no reduction can apply to it; the message says why."""


def _dataflow(gm: fx.GraphModule, sources: list[fx.Node]) -> nx.DiGraph:
    """Edges along which tensor *values* flow from the inputs.

    Size queries (``sym_size``) carry no values: ``cls_token.expand(x.shape[0], ...)`` does not
    depend on the image, and treating it as if it did would hide which tokens come from the image.
    """
    g = nx.DiGraph()
    live = set(sources)
    for node in gm.graph.nodes:
        if node in live:
            g.add_node(node)
        if isinstance(node.meta.get("val"), torch.SymInt) or node.target == torch.ops.aten.sym_size.int:
            continue
        for inp in node.all_input_nodes:
            if inp in live:
                live.add(node)
                g.add_edge(inp, node)
    return g


def _ratio(a, b) -> Optional[int]:
    """``a / b`` for two (symbolic) sizes when it is a whole number (``3 * s0 / s0`` -> 3), else None."""
    import sympy

    ea = a.node.expr if isinstance(a, torch.SymInt) else sympy.Integer(int(a))
    eb = b.node.expr if isinstance(b, torch.SymInt) else sympy.Integer(int(b))
    r = sympy.simplify(ea / eb)
    return int(r) if r.is_Integer and int(r) > 0 else None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _cls in stack.values()] if stack else []
    return paths[-1] if paths else ""


class _Finder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and P.val(n) is not None]
        if not placeholders:
            raise NoAttentionError("the graph has no tensor input")
        # the image is the floating-point input of rank 4 (or the first tensor input)
        images = [n for n in placeholders if P.rank(n) == 4 and P.val(n).is_floating_point()]
        self.image = images[0] if images else placeholders[0]
        self.g = _dataflow(gm, placeholders)
        self._anc: dict[fx.Node, set] = {}
        self.matched: dict[str, int] = {}  # attention pattern name -> cores it matched

    def ancestors(self, node: fx.Node) -> set:
        if node not in self._anc:
            self._anc[node] = nx.ancestors(self.g, node) if node in self.g else set()
        return self._anc[node]

    # -- attention cores ---------------------------------------------------------------------
    def attention_cores(self) -> list[AttentionInfo]:
        found = []
        for node in self.gm.graph.nodes:
            if P.is_call(node, P.SDPA_OPS):
                found.append(self._sdpa(node))
                self.matched["sdpa"] = self.matched.get("sdpa", 0) + 1
            elif P.is_call(node, P.SOFTMAX_OPS):
                info = self._manual(node)
                if info is not None:
                    found.append(info)
        return found

    def _heads(self, q: fx.Node) -> tuple[int, int]:
        shape = P.val(q).shape
        heads = int(shape[1]) if len(shape) == 4 else 1
        if len(shape) == 3:  # [B * H, N, D], heads folded into the batch (nn.MultiheadAttention)
            heads = _ratio(shape[0], P.val(self.image).shape[0]) or 1
        return heads, int(shape[-1])

    def _sdpa(self, node: fx.Node) -> AttentionInfo:
        q, k, v = node.args[:3]
        heads, head_dim = self._heads(q)
        scale = P.arg(node, 7, "scale")
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        mask = P.arg(node, 3, "attn_mask")
        return AttentionInfo("sdpa", node, q, k, v, heads, head_dim, float(scale), attn_mask=mask)

    def _manual(self, softmax: fx.Node) -> Optional[AttentionInfo]:
        """``output(probs(softmax(scale(scores(q, k)) [+ mask])), v)``, the scores and output read by the
        declarative patterns of :mod:`tokenopt.passes.patterns` (``SCORE_PATTERNS``, ``OUTPUT_PATTERNS``).

        Keys a pattern reads in another layout (``Scores.k_perm``) are recorded as the node they come
        from; ``canonicalize_attention`` reads the pattern again and inserts the permute."""
        if P.norm_dim(softmax.args[1], P.rank(softmax)) != P.rank(softmax) - 1:
            return None
        scale, mask = 1.0, None
        up = softmax.args[0]
        path = []  # the logits path from the scores up to the softmax, last first
        while isinstance(up, fx.Node) and (not P.is_call(up, P.MATMUL_OPS | P.EINSUM_OPS)
                                           or P.head_mix_input(up) is not None):
            path.append(up)
            scaled = P.scalar_operand(up) if P.is_call(up, P.MUL_OPS | P.DIV_OPS) else None
            if scaled is not None:
                up, factor = scaled
                scale *= factor
            elif P.is_call(up, P.ADD_OPS) and all(isinstance(a, fx.Node) for a in up.args[:2]):
                # logits + mask: the mask is the operand that is not the logits chain
                a, b = up.args[:2]
                up, mask = (a, b) if P.rank(a) == P.rank(softmax) and b not in self.ancestors(a) else (b, a)
            elif P.is_call(up, P.IDENTITY_OPS):
                up = up.args[0]
            elif P.head_mix_input(up) is not None and P.rank(softmax) == 4:  # talking heads (checked below)
                up = P.head_mix_input(up)
            else:
                return None
        mm1 = up
        found = P.match_scores(mm1)
        if found is None:
            return None
        q, k = found[1].q, found[1].k
        scaled = P.scalar_operand(q) if P.is_call(q, P.MUL_OPS | P.DIV_OPS) else None
        if scaled is not None:
            q, factor = scaled
            scale *= factor
        down, after = softmax, []
        while True:
            users = P.live_users(down)  # nn.MultiheadAttention's unused averaged weights do not count
            if len(users) != 1:
                return None
            user = users[0]
            out = P.match_output(user, down)
            if out is not None:
                break
            if P.is_call(user, P.IDENTITY_OPS) or P.head_mix_input(user) is down and P.rank(softmax) == 4:
                down = user
                after.append(user)
                continue
            return None
        mm2, v = user, out[1]
        chain = list(reversed(path)) + [softmax] + after
        mixed = any(P.is_call(n, P.HEAD_MIX_OPS) for n in chain)
        if mixed:  # the heads are mixed around the softmax: each step must act on the head axis only
            heads = int(P.val(mm1).shape[1])
            if P.head_mix_labels(chain[:chain.index(softmax)], mm1, heads) != ("b", "h", "i", "j") \
                    or P.head_mix_labels(chain, mm1, heads) != ("b", "h", "i", "j"):
                return None
        for name in (found[0].name, out[0].name):
            self.matched[name] = self.matched.get(name, 0) + 1
        heads, head_dim = self._heads(q)
        if mixed:
            self.matched["head mixing"] = self.matched.get("head mixing", 0) + 1
        return AttentionInfo(
            "manual", mm2, q, k, v, heads, head_dim, scale, softmax=softmax, attn_mask=mask, matmul_qk=mm1,
            head_mix=mixed,
        )

    # -- residual structure ------------------------------------------------------------------
    def residual_adds(self) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
        """(add, skip, branch) for every add whose one operand feeds the other."""
        out = []
        for node in self.gm.graph.nodes:
            if not P.is_call(node, P.ADD_OPS) or len(node.args) < 2:
                continue
            a, b = node.args[:2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or P.rank(node) != 3:
                continue
            if P.val(a) is None or P.val(b) is None or P.val(a).shape != P.val(b).shape:
                continue
            if a in self.ancestors(b):
                out.append((node, a, b))
            elif b in self.ancestors(a):
                out.append((node, b, a))
        return out


def _first_of(nodes, targets, order) -> Optional[fx.Node]:
    hits = sorted((n for n in nodes if P.is_call(n, targets)), key=order.__getitem__)
    return hits[0] if hits else None


def _layer_scale(branch: fx.Node) -> Optional[fx.Node]:
    """``branch = t * gamma`` with ``gamma`` a learned ``[C]`` vector: LayerScale."""
    if not P.is_call(branch, P.MUL_OPS):
        return None
    a, b = branch.args[:2]
    for cand in (a, b):
        if P.is_param(cand) and P.rank(cand) == 1:
            return branch
    return None


def _prefix_tokens(finder: _Finder, x_in: fx.Node, tokens: int) -> tuple[int, Optional[fx.Node]]:
    """Count the tokens concatenated in front of the image tokens before the first block.

    The last ``cat`` on the token axis before block 0 builds the sequence; however its operands were
    staged, the prefix is read through them: an operand that does not depend on the image (a CLS,
    distillation or register token) is all prefix; a nested ``cat`` counts its own prefix; a slice on
    the token axis of an image-dependent sequence keeps the prefix tokens it covers (Hugging Face
    Dinov2-with-registers: ``cat([x[:, :1], registers, x[:, 1:]])`` after ``x = cat([cls, patches])``).
    """
    cands = [
        n for n in finder.ancestors(x_in) | {x_in}
        if P.is_call(n, P.CAT_OPS) and P.rank(n) == 3
        and P.norm_dim(P.arg(n, 1, "dim", 0), 3) == 1 and int(P.val(n).shape[1]) == tokens
    ]
    if not cands:
        return 0, None
    cat = max(cands, key=finder.order.__getitem__)
    return _leading_prefix(finder, cat), cat


def _leading_prefix(finder: _Finder, node: fx.Node) -> int:
    """How many leading tokens (axis 1) of the image-dependent ``node`` are prefix tokens."""
    if node is finder.image or node not in finder.g:
        return 0
    if P.is_call(node, P.CAT_OPS) and P.rank(node) == 3 and P.norm_dim(P.arg(node, 1, "dim", 0), 3) == 1:
        prefix = 0
        for part in node.args[0]:
            size = int(P.val(part).shape[1])
            if part is finder.image or part in finder.g and finder.image in finder.ancestors(part):
                inner = _leading_prefix(finder, part)
                if inner < size:  # this operand holds image tokens: the prefix ends inside it
                    return prefix + inner
            prefix += size
        return prefix
    if P.is_call(node, P.SLICE_OPS) and P.rank(node) == 3 and P.norm_dim(node.args[1], 3) == 0:
        return _leading_prefix(finder, node.args[0])  # x[:, ...] slices the batch axis whole
    if P.is_call(node, P.SLICE_OPS) and P.rank(node) == 3 and P.norm_dim(node.args[1], 3) == 1:
        src = node.args[0]
        start = P.arg(node, 2, "start", 0) or 0
        end = min(P.arg(node, 3, "end", P.INT64_MAX) or 0, int(P.val(src).shape[1]))
        return max(0, min(end, _leading_prefix(finder, src)) - start)
    if P.is_call(node, P.ROWWISE_OPS) and P.rank(node) == 3:  # + positions, dropout, norm: same tokens
        srcs = [a for a in node.all_input_nodes if a in finder.g and P.rank(a) == 3]
        return _leading_prefix(finder, srcs[0]) if len(srcs) == 1 else 0
    return 0


def _trailing_suffix(finder: _Finder, cat: fx.Node) -> int:
    """Tokens at the end of the sequence-building ``cat`` that do not come from the image (YOLOS appends
    its detection tokens after the patches)."""
    suffix = 0
    for part in reversed(cat.args[0]):
        if part is finder.image or part in finder.g and finder.image in finder.ancestors(part):
            break
        suffix += int(P.val(part).shape[1])
    return suffix


def _head_readers(finder: _Finder, x_out: fx.Node, pools: list[AttentionInfo] = ()) -> list[HeadReader]:
    readers, frontier, seen = [], [x_out], set()
    offset = {x_out: 0}  # tokens put in front of the stream by a cat (CaiT: cat([cls, x]) before the norm)
    # the keys/values of a pooling head's attention, and everything computing them from the tokens
    pool_inputs = {}
    for pool in pools:
        for n in (pool.k, pool.v):
            for a in finder.ancestors(n) | {n}:
                pool_inputs.setdefault(a, pool)
    found_pools = set()
    while frontier:
        node = frontier.pop(0)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            nd = P.rank(node)
            if user in pool_inputs and not P.is_call(user, P.ROWWISE_OPS):
                pool = pool_inputs[user]
                if pool.core not in found_pools:  # the tokens reach a pooling query's keys and values
                    found_pools.add(pool.core)
                    readers.append(HeadReader("attn_pool", pool.core, attention=pool))
            elif P.is_call(user, P.SLICE_OPS) and P.norm_dim(user.args[1], nd) == 0:
                offset[user] = offset[node]
                frontier.append(user)  # x[:, ...] slices the batch axis whole
            elif P.is_call(user, P.SELECT_OPS) and P.norm_dim(user.args[1], nd) == 1 and offset[node]:
                if int(user.args[2]) >= offset[node]:  # a token of the stream, behind the cat's others
                    readers.append(HeadReader("other", user))
                # else: it reads a token the cat put in front (CaiT's class token): none of the stream's
            elif offset[node] and not (P.is_call(user, P.ROWWISE_OPS) and P.rank(user) == nd):
                readers.append(HeadReader("other", user))
            elif user.op == "output":
                readers.append(HeadReader("tokens", node))
            elif P.is_call(user, P.SELECT_OPS) and P.norm_dim(user.args[1], nd) == 1:
                readers.append(HeadReader("token", user, index=int(user.args[2])))
            elif (P.is_call(user, P.CAT_OPS) and P.rank(user) == 3 and P.norm_dim(P.arg(user, 1, "dim", 0), 3) == 1
                  and user.args[0][-1] is node and all(_not_from(finder, a, node, pools) for a in user.args[0][:-1])):
                # the stream behind tokens from elsewhere: followed while only those are read
                offset[user] = sum(int(P.val(a).shape[1]) for a in user.args[0][:-1])
                frontier.append(user)
            elif P.is_call(user, P.SLICE_OPS) and P.norm_dim(user.args[1], nd) == 1:
                start = P.arg(user, 2, "start", 0) or 0
                end = P.arg(user, 3, "end", None)
                end = None if end is None or end >= P.INT64_MAX else end
                means = [u for u in user.users if P.is_call(u, P.MEAN_OPS) and list(u.args[1]) in ([1], [-2])]
                kind = "mean" if means and len(means) == len(user.users) else "other"
                readers.append(HeadReader(kind, means[0] if kind == "mean" else user, start=start, end=end))
            elif P.is_call(user, P.MEAN_OPS) and [P.norm_dim(d, nd) for d in user.args[1]] == [1]:
                readers.append(HeadReader("mean", user))
            elif P.is_call(user, P.ROWWISE_OPS) and P.rank(user) == nd:
                offset[user] = offset[node]
                frontier.append(user)
            else:
                readers.append(HeadReader("other", user))
    return readers


_POOL_OPS = {torch.ops.aten.max_pool2d.default, torch.ops.aten.max_pool2d_with_indices.default,
             torch.ops.aten.avg_pool2d.default, torch.ops.aten.max_pool3d.default,
             torch.ops.aten.max_pool3d_with_indices.default, torch.ops.aten.amax.default}


def _no_residual_reason(finder: _Finder, att: AttentionInfo) -> str:
    """Why the residual around ``att`` is not a ``[B, N, C]`` one, read from the add that does take its
    result: a stream kept as ``[B, H, W, C]`` (windowed models), a pooled skip (pooling hierarchies), a
    skip that is a slice of the stream; or no add at all."""
    for node in finder.gm.graph.nodes:
        if not P.is_call(node, P.ADD_OPS) or len(node.args) < 2 or not all(isinstance(a, fx.Node) for a in node.args[:2]):
            continue
        a, b = node.args[:2]
        with_core = [t for t in (a, b) if att.core in finder.ancestors(t) | {t}]
        if len(with_core) != 1:
            continue
        skip = b if with_core[0] is a else a
        skip_anc = finder.ancestors(skip) | {skip}
        if att.core in skip_anc:
            continue
        if P.rank(node) == 4:
            return ("the residual stream is kept as [B, H, W, C] (Swin's and SAM's windowed blocks, VOLO), "
                    "a grid that fixes where every token sits (windows are cut from it, later layers read it "
                    "as an image), so tokens cannot be dropped or merged without rebuilding that grid; "
                    "tokenopt does not reduce such models.")
        window = [n for n in finder.ancestors(with_core[0]) if P.is_call(n, _POOL_OPS)]
        pooled = [n for n in skip_anc - finder.ancestors(att.q) if P.is_call(n, _POOL_OPS)]
        if pooled or window:
            return (f"its skip is a pooled copy of the stream ({(pooled or window)[0].name}: a pooling hierarchy "
                    "such as Hiera or MViTv2), so each stage runs at its own token count on a grid the pooling "
                    "needs whole; tokenopt does not reduce such models.")
        if P.is_call(skip, P.SLICE_OPS):
            return (f"its skip is a slice of the stream ({skip.name}: the class token alone, as in CaiT's or "
                    "CrossViT's cross-attention), not the stream the attention reads.")
        return f"the add that takes its result ({node.name}) has shape {tuple(P.val(node).shape)}, not [B, N, C]."
    return "its result is not added back to the stream it reads (no skip connection)."


def _not_from(finder: _Finder, front: fx.Node, stream: fx.Node, pools) -> bool:
    """Whether ``front`` holds none of ``stream``'s tokens: it does not depend on it, or only through a
    head attention that reads it (CaiT's class token after its class-attention layers)."""
    if front is stream:
        return False
    anc = finder.ancestors(front) | {front}
    return stream not in anc or any(p.core in anc for p in pools)


def find_blocks(gm: fx.GraphModule) -> PassResult:
    """Find the transformer blocks of ``gm`` and record them (see the module docstring).

    Args:
        gm: a GraphModule from :func:`tokenopt.capture`.

    Returns:
        ``PassResult(gm, modified=False)``; the facts are in ``gm.meta[MODEL_INFO]`` and ``node.meta``.

    Raises:
        NoAttentionError: the model has no attention (a CNN or an MLP, for example).
        BlockStructureError: attention without the pre-norm residual structure of a ViT block.

    Example:
        >>> import timm, tokenopt
        >>> from tokenopt.passes import find_blocks, get_model_info
        >>> gm = tokenopt.capture(timm.create_model("deit_tiny_patch16_224", depth=3))
        >>> _ = find_blocks(gm)
        >>> info = get_model_info(gm)
        >>> len(info.blocks), info.num_prefix_tokens, info.num_patch_tokens
        (3, 1, 196)
    """
    finder = _Finder(gm)
    cores = finder.attention_cores()
    name = gm.meta.get("tokenopt.source", "the model")
    if not cores:
        softmaxes = [n for n in gm.graph.nodes if P.is_call(n, P.SOFTMAX_OPS)]
        where = sorted({_module_path(n) or "the top module" for n in softmaxes})
        if softmaxes:
            raise NoAttentionError(
                f"no attention blocks recognised in {name}: its {len(softmaxes)} softmax node(s) (in "
                f"{', '.join(where[:4])}{' ...' if len(where) > 4 else ''}) are not part of an attention "
                "pattern tokenopt knows (scaled_dot_product_attention, or scores by matmul or einsum -> "
                f"softmax -> matmul or einsum with the values). Fix: {_FIX}.",
                unrecognised=where,
            )
        raise NoAttentionError(
            f"no attention blocks found in {name}: none of its {len(gm.graph.nodes)} graph nodes is a "
            "scaled_dot_product_attention or a softmax (CNNs and MLPs have no tokens to reduce); "
            "tokenopt reduces tokens in Vision Transformers."
        )
    residuals = finder.residual_adds()
    cores_set = {c.core for c in cores}
    blocks: list[BlockInfo] = []
    pools: list[AttentionInfo] = []  # attention with no residual around it, after the blocks: a pooling head
    for att in cores:
        n_q, n_k = P.attention_counts(att)
        if n_q != n_k:
            # queries from fewer tokens than the keys: CaiT's class attention, a pooling query (MAP head),
            # cross-attention. After the blocks it is part of the head: it reads the reduced tokens
            if blocks and finder.order[att.core] > finder.order[blocks[-1].x_out]:
                pools.append(att)
                continue
            earlier = sorted({_module_path(n) for n in gm.graph.nodes
                              if P.is_call(n, P.SOFTMAX_OPS) and finder.order[n] < finder.order[att.core]})
            where = "before or between the self-attention blocks" if blocks else (
                "with no self-attention block recognised before it" + (
                    f" (the softmaxes in {', '.join(earlier[:3])} are not attention tokenopt reads: channel "
                    "attention, say)" if earlier else ""))
            raise BlockStructureError(
                f"attention node {att.core.name} ({_module_path(att.core) or 'unknown module'}) in {name} "
                f"attends from {n_q} queries to {n_k} keys (pooled queries or keys, class or cross-attention) "
                f"{where}; tokenopt reduces tokens in self-attention blocks on one token stream. Fix: {_FIX}.")
        attn_res = next(
            (r for r in residuals
             if att.core in finder.ancestors(r[2]) | {r[2]} and att.core not in finder.ancestors(r[1])),
            None,
        )
        if attn_res is None and blocks and finder.order[att.core] > finder.order[blocks[-1].x_out]:
            pools.append(att)
            continue
        if attn_res is None:
            raise BlockStructureError(
                f"attention node {att.core.name} ({_module_path(att.core) or 'unknown module'}) in {name} "
                f"has no residual add around it (x + attn(...)) on a [B, N, C] token stream: "
                f"{_no_residual_reason(finder, att)} Fix: {_FIX}."
            )
        attn_add, x_in, attn_branch = attn_res
        twin = next((b for b in blocks if b.attn_add is attn_add), None)
        if twin is not None:
            raise BlockStructureError(
                f"attention nodes {twin.attention.core.name} and {att.core.name} "
                f"({_module_path(att.core) or 'unknown module'}) in {name} are parallel branches added to the "
                "stream together (x + attn_1(x) + attn_2(x), timm's ParallelThingsBlock); tokenopt rewrites "
                f"blocks with one attention per residual. Fix: {_FIX}.")
        mlp_res = None
        for r in residuals:
            add, skip, branch = r
            if finder.order[add] <= finder.order[attn_add] or attn_add not in finder.ancestors(add):
                continue
            between = finder.ancestors(branch) | {branch}
            if cores_set & (between - finder.ancestors(attn_add) - {attn_add}):
                break  # reached the next block's attention: this block has no MLP
            if any(P.is_call(n, P.LINEAR_OPS) for n in between - finder.ancestors(attn_add)):
                mlp_res = r
                break
        if mlp_res is None:
            raise BlockStructureError(
                f"attention node {att.core.name} ({_module_path(att.core) or 'unknown module'}) in {name} "
                "is not followed by an MLP residual (x + mlp(norm(x))); parallel or MLP-free blocks are "
                f"not supported yet. Fix: {_FIX}."
            )
        mlp_add, _skip, mlp_branch = mlp_res
        attn_nodes = (finder.ancestors(attn_add) - finder.ancestors(x_in)) - {x_in}
        mlp_nodes = (finder.ancestors(mlp_add) - finder.ancestors(attn_add)) - {attn_add}
        order = finder.order
        att.proj = _first_of(attn_nodes - finder.ancestors(att.core) - {att.core}, P.LINEAR_OPS, order)
        att.qkv_linears = sorted(
            (n for n in finder.ancestors(att.core) & attn_nodes if P.is_call(n, P.LINEAR_OPS)), key=order.__getitem__
        )
        linears = sorted((n for n in mlp_nodes if P.is_call(n, P.LINEAR_OPS)), key=order.__getitem__)
        acts = sorted((n for n in mlp_nodes if P.is_call(n, P.ACTIVATION_OPS)), key=order.__getitem__)
        shape = P.val(attn_add).shape
        blocks.append(
            BlockInfo(
                index=len(blocks),
                x_in=x_in,
                x_mid=attn_add,
                x_out=mlp_add,
                attn_add=attn_add,
                mlp_add=mlp_add,
                attn_branch=attn_branch,
                mlp_branch=mlp_branch,
                attention=att,
                mlp=MLPInfo(linears, acts),
                norm1=_first_of(finder.ancestors(att.core) & attn_nodes, P.NORM_OPS, order),
                norm2=_first_of(mlp_nodes, P.NORM_OPS, order),
                layer_scale1=_layer_scale(attn_branch),
                layer_scale2=_layer_scale(mlp_branch),
                tokens=int(shape[1]),
                channels=int(shape[2]),
                module_path=_module_path(attn_add),
                nodes=sorted(attn_nodes | mlp_nodes | {attn_add, mlp_add}, key=order.__getitem__),
            )
        )

    for blk in blocks:
        for node in blk.nodes:
            node.meta[META_BLOCK] = blk.index
        roles = {
            "residual.in": blk.x_in, "attn.q": blk.attention.q, "attn.k": blk.attention.k,
            "attn.v": blk.attention.v, "attn.core": blk.attention.core, "attn.proj": blk.attention.proj,
            "attn.add": blk.attn_add, "mlp.add": blk.mlp_add, "norm1": blk.norm1, "norm2": blk.norm2,
            "ls1": blk.layer_scale1, "ls2": blk.layer_scale2,
        }
        roles.update({f"mlp.fc{i + 1}": n for i, n in enumerate(blk.mlp.linears)})
        for role, node in roles.items():
            if node is not None and role != "residual.in":
                node.meta[META_ROLE] = role

    tokens = blocks[0].tokens
    prefix, cat = _prefix_tokens(finder, blocks[0].x_in, tokens)
    info = ModelInfo(
        blocks=blocks,
        token_axis=1,
        num_prefix_tokens=prefix,
        num_patch_tokens=tokens - prefix,
        head_readers=_head_readers(finder, blocks[-1].x_out, pools),
        image_input=finder.image,
        prefix_cat=cat,
        num_suffix_tokens=_trailing_suffix(finder, cat) if cat is not None else 0,
    )
    gm.meta[MODEL_INFO] = info
    gm.meta.setdefault("tokenopt.counters", {})["find_blocks"] = {"patterns": dict(finder.matched)}
    # attention maps ([..., N, N]-like softmaxes) outside every block found: attention tokenopt leaves as
    # it is (channel attention with a temperature, gated positional attention, ...); optimize warns
    inside = {b.attention.softmax for b in info.blocks} | {n for b in info.blocks for n in b.nodes} | {
        p.softmax for p in pools}  # a head's attention is read too (attn_pool)
    gm.meta["tokenopt.unrecognised_attention"] = sorted({
        _module_path(n) or n.name for n in gm.graph.nodes
        if P.is_call(n, P.SOFTMAX_OPS) and P.rank(n) >= 3 and n not in inside})
    return PassResult(gm, False)


find_blocks.ensures = ("model_info",)


def image_dependent_nodes(gm: fx.GraphModule) -> set:
    """The nodes whose values depend on the model's inputs (weights and constants do not)."""
    return set(_Finder(gm).g.nodes)


def get_model_info(gm: fx.GraphModule) -> ModelInfo:
    """The :class:`ModelInfo` that ``find_blocks`` stored on ``gm`` (running it if it has not run)."""
    if MODEL_INFO not in gm.meta:
        find_blocks(gm)
    return gm.meta[MODEL_INFO]
