"""realize_tokens: execute every token decision of the plan, in the execution form the user picked.

The policy passes (one per policy, :mod:`tokenopt.policies`) only *decide*: they put
:class:`~tokenopt.ir.PlannedDecision` entries in ``gm.meta[META_PLAN]``. This pass walks the blocks in
residual-stream order, threads the token state from block to block and, where the plan has a
decision, calls it with a :class:`DecisionContext` (per-token tables of the current tokens: CLS
attention, value norms, key metric, validity) and realises the :class:`~tokenopt.ir.Keep` or
:class:`~tokenopt.ir.Merge` it returns. It knows no policy; policies know no execution form:

``"padded"``  tokens leave the buffer: ``[B, M, C]`` with ``M`` the decision's width; a count that
              varies per image is padded to a static capacity (the policy's bound) and masked, so
              nothing is read back to the host.
``"masked"``  the buffer keeps its length ``N``: kept tokens come first in the order the other forms
              give, the rest are masked out of attention (``-inf`` key bias) and pooling. Nothing is
              saved; every op is differentiable: the form training uses.
``"packed"``  per-image counts pack into one ``[1, T, C]`` buffer with offsets ``cu`` (ragged):
              linears and MLPs run on exactly the kept tokens, attention is one
              ``tokenopt.varlen_attention`` op. Fixed counts need no packing and stay padded.

The state that later blocks read flows through the graph as values: ``valid [B, L]`` (real tokens),
``size [B, L, 1]`` (patches a merged token stands for), ``bias [B, 1, 1, L]`` (added to every later
attention's logits), ``cu [B + 1]`` (packed offsets). At the end the head is rewired (a pooling head
becomes a mean over valid tokens, size-weighted after merges; a packed token read becomes
``packed_select``) and reshapes that had the captured token count baked in get run-time sizes
(:func:`~tokenopt.passes.retarget.retarget_token_sizes`).

Every inserted node is a ``torch.ops.tokenopt.*`` op (:mod:`tokenopt.kernels.ops`) or an ATen op, with
provenance (pass, policy, block). Writes ``gm.meta["tokenopt.counters"]["realize_tokens"]`` and
``gm.meta["tokenopt.count_nodes"]`` (per block: the node whose value gives the per-image token count)
and ``gm.meta["tokenopt.decisions"]`` (per decision: block, kind and the names of its nodes, which
stay in the graph so that a run can be followed, as :func:`tokenopt.viz.token_sources` does).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import tokenopt.kernels.ops  # noqa: F401  (registers torch.ops.tokenopt.*)
from tokenopt.ir import META_PLAN, META_ROLE, SITES, BlockInfo, Gate, Halt, Keep, Mask, Merge, ModelInfo, PlannedDecision, stamp
from tokenopt.passes import patterns as P
from tokenopt.passes.find_blocks import _module_path, get_model_info

__all__ = ["MODES", "RewriteError", "TokenState", "DecisionContext", "RealizeTokens"]

MODES = ("padded", "masked", "packed")
aten = torch.ops.aten
tk = torch.ops.tokenopt


class RewriteError(ValueError):
    """A block cannot be rewritten; the message names the block, the node and what to do."""

    user_error = True  # the pipeline passes it on as it is: it already names the model part and the fix


@dataclass
class TokenState:
    """The current tokens, as graph values and static facts."""

    length: int  # tokens per image in the buffer (dense), or the per-image capacity (packed)
    active: Optional[int]  # real tokens per image when the same for all images, else None
    valid: Optional[fx.Node] = None  # [B, length] bool (dense)
    size: Optional[fx.Node] = None  # [B, length, 1] (dense) / [1, T, 1] (packed)
    bias: Optional[fx.Node] = None  # [B, 1, 1, length] (dense)
    cu: Optional[fx.Node] = None  # [B + 1] packed offsets
    cap: Any = None  # packed: the longest image's count this batch (a SymInt node), room for attention
    proportional: bool = False
    pos: Optional[fx.Node] = None  # [B, length] original position of each token (models with side tables)
    home: Optional[fx.Node] = None  # [B, N0] each original token's current row, -1 once dropped (dense=True)
    dense: Optional[fx.Node] = None  # [B, N0, C] dropped tokens' last values (dense=True), or halted ones' outputs
    halt: Optional[dict] = None  # adaptive halting: cum, rem, rho, acc per current row (Halt decisions)
    grid: Optional[fx.Node] = None  # the head's [B, N0, C] input once the last Halt is realised
    soft: Optional[fx.Node] = None  # [B, L] soft key mask of a Mask decision (training form)
    changed: bool = False  # a decision has been realised: the tokens differ from the captured ones

    @property
    def packed(self) -> bool:
        return self.cu is not None

    @property
    def count(self) -> Optional[fx.Node]:
        """The node whose value gives per-image counts: packed offsets, or validity (None: all equal)."""
        return self.cu if self.packed else self.valid


def _keys_in_front(gm: fx.GraphModule, att) -> int:
    """How many keys of a head's attention come from tokens of its own put in front of the block tokens
    (CaiT's class attention over ``cat([cls, x])``): 0 when its keys are the stream's tokens. Raises
    when they are put elsewhere (behind or between): the key bias could not line up."""
    n0 = get_model_info(gm).num_tokens
    nk = int(P.attention_counts(att)[1])
    if nk == n0:
        return 0
    stack, seen = [att.k], set()
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if P.is_call(node, P.CAT_OPS) and P.rank(node) == 3 and P.norm_dim(P.arg(node, 1, "dim", 0), 3) == 1 \
                and int(P.val(node).shape[1]) == nk:
            *front, last = node.args[0]
            if int(P.val(last).shape[1]) == n0 and sum(int(P.val(a).shape[1]) for a in front) == nk - n0:
                return nk - n0
            break
        stack.extend(node.all_input_nodes)
    raise RewriteError(
        f"the head's attention {att.core.name} ({_module_path(att.core)}) runs over {nk} keys, the "
        f"{n0} block tokens and others not put in front of them, so the reduced tokens cannot be lined up "
        "with its keys; use policy='none' for this model")


def _refuse_padding_after_mixing(att, state: TokenState, who: str, also: str = "") -> None:
    """Heads mixed after the softmax give a key of probability 0 a weight again (the mixing's bias), so
    padding keys cannot be masked there: per-image counts are refused."""
    if state.valid is not None and _mixes_after(att):
        raise RewriteError(
            f"{who} mixes its heads after the softmax (talking heads or re-attention), which gives padding keys "
            "a weight again, so images with different token counts cannot share a padded batch through it, and "
            f"the policy keeps per-image counts. Fix: a policy with one count per batch (tome, pitome, topk){also}")


def _bias_logits(ins: "_Inserter", att, bias: fx.Node) -> None:
    """A key bias into a manual chain's logits right before its softmax, where SDPA would add it."""
    ins.anchor = att.softmax
    att.softmax.update_arg(0, ins(aten.add.Tensor, att.softmax.args[0], bias, role="tokens.bias"))


def _mixes_after(att) -> bool:
    """Whether a manual attention chain mixes heads between its softmax and the product with v."""
    node = att.softmax
    while node is not None and node is not att.core:
        users = P.live_users(node)
        node = users[0] if len(users) == 1 else None
        if node is not None and node is not att.core and P.is_call(node, P.HEAD_MIX_OPS):
            return True
    return False


class _Inserter:
    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, block: int, policy: str):
        self.gm, self.anchor, self.block, self.policy = gm, anchor, block, policy

    def __call__(self, target, *args, role: Optional[str] = None, **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, args, kwargs)
        stamp(node, block=self.block, policy=self.policy, **{"pass": "realize_tokens"})
        if role:
            node.meta[META_ROLE] = role
        return node

    def module(self, target: str, *args, role: Optional[str] = None) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_module(target, args)
        stamp(node, block=self.block, policy=self.policy, **{"pass": "realize_tokens"})
        if role:
            node.meta[META_ROLE] = role
        return node

    def items(self, node: fx.Node, n: int, roles=()) -> list[fx.Node]:
        roles = list(roles) + [None] * (n - len(roles))
        return [self(operator.getitem, node, i, role=roles[i]) for i in range(n)]


class DecisionContext:
    """What a policy sees of one block at one site: per-image tables of the current tokens.

    Tables are dense ``[B, L]`` (``L = length``) whatever the execution form: on packed tokens they
    are read straight from the packed q/k/v, padded to the capacity, with ``valid`` marking real ones.

    Attributes:
        block: the :class:`~tokenopt.ir.BlockInfo`.
        num_prefix: prefix tokens (CLS, distillation, registers) at the front of every image; never
            decided on. ``num_patches``: the model's patch tokens (for budgets given as shares).
        length: the width of the tables; ``tokens``: the real tokens per image when that is the same
            for every image, else None.
        policy: the deciding policy's name (provenance of the nodes it inserts).
    """

    def __init__(self, realizer: "RealizeTokens", gm, info: ModelInfo, blk: BlockInfo, state: TokenState,
                 site: str, anchor: fx.Node, x: Optional[fx.Node], policy: str):
        self._r, self.gm, self.block, self._state, self.site = realizer, gm, blk, state, site
        self.num_prefix, self.num_patches = info.num_prefix_tokens, info.num_patch_tokens
        # token 0 is a CLS token when the head reads it, or when it is the only prefix token (a pooling
        # model that keeps its class token); several prefix tokens none of which the head reads are
        # registers, and a register's attention is no CLS score
        self.has_cls = info.num_prefix_tokens == 1 or info.num_prefix_tokens > 1 and any(
            r.kind == "token" and r.index == 0 for r in info.head_readers)
        self.length, self.tokens, self.policy = state.length, state.active, policy
        self.depth = len(info.blocks)
        self.call = _Inserter(gm, anchor, blk.index, policy)
        self._x = x
        self._packed_tables: Optional[list[fx.Node]] = None

    # -- tables ------------------------------------------------------------------------------------
    def _packed(self) -> list[fx.Node]:
        if self._packed_tables is None:
            att, s = self.block.attention, self._state
            node = self.call(tk.packed_cls_attention.default, att.q, att.k, att.v, s.cu, s.cap, att.scale,
                             s.size if s.proportional else None, role="tokens.cls_attn")
            self._packed_tables = self.call.items(node, 3)
        return self._packed_tables

    @property
    def packed(self) -> bool:
        return self._state.packed

    @property
    def needs_positions(self) -> bool:
        """The model indexes tables by token position: a Merge must say which token keeps its place (rep)."""
        return self._r.needs_positions

    @property
    def valid(self) -> Optional[fx.Node]:
        """``[B, L]`` bool of real tokens, or None when every token is real."""
        return self._packed()[2] if self._state.packed else self._state.valid

    def cls_attention(self) -> fx.Node:
        """Softmax attention row of the CLS token over the current tokens, ``[B, H, L]`` (float32)."""
        if self._state.packed:
            return self._packed()[0]
        att = self.block.attention
        return self.call(tk.cls_attention.default, att.q, att.k, att.scale, self._state.bias, role="tokens.cls_attn")

    def value_norms(self) -> fx.Node:
        """Norm of each token's value vector over all heads, ``[B, L]`` (float32)."""
        if self._state.packed:
            return self._packed()[1]
        return self.call(tk.value_norms.default, self.block.attention.v)

    def key_metric(self) -> fx.Node:
        """The keys averaged over heads, ``[B, L, D]`` (ToMe's similarity metric). Dense tokens only."""
        self.require_dense("a key metric")
        return self.call(aten.mean.dim, self.block.attention.k, [1], role="tokens.metric")

    @property
    def x(self) -> fx.Node:
        """The residual stream at this site: ``[B, L, C]`` (post-attention site, dense tokens), or at the
        block input or output (``pre_block``, ``post_block`` sites) its rows in any layout (``[1, T, C]``
        when packed)."""
        if self._x is None or self._state.packed and self.site not in ("pre_block", "post_block"):
            raise RewriteError(f"block {self.block.index}: {self.policy} reads the residual stream, which "
                               "is only available after attention on dense (unpacked) tokens")
        return self._x

    def dense_tokens(self, rows: Optional[fx.Node] = None) -> tuple[fx.Node, Optional[fx.Node]]:
        """The residual stream at this site laid out per image, ``([B, L, C], valid [B, L] or None)``:
        packed tokens are unpacked to this batch's longest image (padding marked invalid). ``rows``: a
        per-token tensor in the stream's layout instead (``[B, L, K]``, or ``[1, T, K]`` packed), e.g. a
        score computed on the packed rows, so that only its ``K`` channels are unpacked."""
        s = self._state
        rows = self.x if rows is None else rows
        if s.packed:
            x, valid = self.call.items(self.call(tk.unpack.default, rows, s.cu, s.cap), 2)
            return x, valid
        return rows, s.valid

    def prefix_token(self, index: int = 0) -> fx.Node:
        """Prefix token ``index`` (the CLS token for 0) of every image at this site, ``[B, C]``, in any layout."""
        if not 0 <= index < self.num_prefix:
            raise RewriteError(f"block {self.block.index}: {self.policy} reads prefix token {index}, but this model has "
                               f"{self.num_prefix} prefix token(s)")
        if self._state.packed:
            return self.call(tk.packed_select.default, self.x, self._state.cu, index)
        return self.call(aten.select.int, self.x, 1, index)

    def require_dense(self, what: str) -> None:
        if self._state.packed or self._state.active is None:
            raise RewriteError(
                f"block {self.block.index}: {self.policy} needs {what} on tokens whose count is the same for "
                "every image, but an earlier adaptive decision made counts per image; put this policy "
                "before the adaptive one (its blocks= earlier) or use it alone"
            )

    # -- learned policies ----------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """The graph being built is the training graph (``prepare_training``): decide in training form."""
        return self._r.training

    @property
    def width(self) -> int:
        """Channels of the residual stream."""
        return int(P.val(self.block.x_in).shape[-1])

    def module(self, name: str, factory) -> str:
        """The policy's learned module ``name`` in the graph (``gm.tokenopt_<policy>.<name>``): made by
        ``factory()`` on first use (seeded, so every process makes the same one), weights from the
        ``policy_state`` given to ``optimize`` / ``prepare_training`` when it has them. Returns its
        qualified name, for :meth:`call_module`."""
        return self._r.policy_module(self.gm, self.policy, name, factory, P.val(self.block.x_in))

    def call_module(self, target: str, *args, role: Optional[str] = None) -> fx.Node:
        return self.call.module(target, *args, role=role)

    def knob(self, name: str, value: float) -> fx.Node:
        """A run-time knob: a 0-d float buffer of the graph (``gm.<name> = v`` sets it on an
        OptimizedModule), ``value`` to start with; returns the node reading it."""
        attr = f"tokenopt_knob_{name}"
        if not hasattr(self.gm, attr):
            self.gm.register_buffer(attr, torch.tensor(float(value), device=P.val(self.block.x_in).device))
            self.gm.meta.setdefault("tokenopt.knobs", {})[name] = attr
        with self.gm.graph.inserting_before(self.call.anchor):
            return self.gm.graph.get_attr(attr)

    def token_weights(self) -> Optional[fx.Node]:
        """``[B, L]`` float: the training mask of a Mask decision, else 1.0 on real tokens (None: every
        token is real)."""
        s = self._state
        if s.soft is not None:
            return s.soft
        if s.packed:
            self.require_dense("token weights")
        if s.valid is None:
            return None
        return self.call(aten._to_copy.default, s.valid, dtype=torch.float32)

    def aux(self, key: str, node: fx.Node) -> None:
        """Return ``node`` from the training graph beside the model's output, under ``key`` (a list, one
        entry per call): what the policy's training losses read."""
        self._r.aux.setdefault(key, []).append(node.name)


@dataclass
class RealizeTokens:
    """The pass. ``mode``: ``"padded"``, ``"masked"`` or ``"packed"`` (see the module docstring)."""

    mode: str = "padded"
    dense: bool = False  # restore the full [B, N0, C] grid after the last block
    training: bool = False  # the training graph: policies decide in training form (prepare_training)
    policy_state: Optional[dict] = field(default=None, repr=False)  # learned policies' weights
    pass_name = "realize_tokens"
    requires = ("model_info", "plan")
    ensures = ("realized",)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        info = get_model_info(gm)
        plan: list[PlannedDecision] = list(gm.meta.get(META_PLAN, []))
        by_site: dict[tuple[int, str], list[PlannedDecision]] = {}
        for d in plan:
            if not 0 <= d.block < len(info.blocks):
                raise RewriteError(f"{d.policy}: block {d.block} does not exist; the model has blocks "
                                   f"0..{len(info.blocks) - 1}")
            by_site.setdefault((d.block, d.site), []).append(d)
        if plan and info.num_suffix_tokens:
            raise RewriteError(
                f"{plan[0].policy}: the token sequence ends in {info.num_suffix_tokens} tokens that do not come "
                "from the image (YOLOS's detection tokens), which the head reads by their place at the end; "
                "tokenopt keeps only leading tokens (CLS, registers) in place and would drop or merge these "
                "like patches. Fix: policy='none' runs the model as captured")
        counts_found = sorted({b.tokens for b in info.blocks}, reverse=True)
        if plan and len(counts_found) > 1:
            stages = "; ".join(
                f"{n} in blocks {', '.join(str(b.index) for b in info.blocks if b.tokens == n)}" for n in counts_found)
            raise RewriteError(
                f"{plan[0].policy}: the blocks run at several token counts ({stages}): a pooling hierarchy "
                "(PiT, LeViT: tokens pooled between stages) or branches at several resolutions (CrossViT), "
                "whose pooling or exchange between branches needs each stage's full token grid; tokenopt "
                "reduces models whose blocks share one token stream. Fix: policy='none' runs the model as "
                "captured")
        state = TokenState(length=info.num_tokens, active=info.num_tokens)
        self.decisions: list[dict] = []
        self.halting: list[dict] = []
        self.aux: dict[str, list[str]] = {}
        self._unused_state = set(self.policy_state or {})
        self._untrained: list[str] = []
        self.dtype = P.val(info.blocks[0].x_in).dtype
        counts: dict[int, Any] = {}
        count_nodes: dict[int, tuple[str, str]] = {}
        decided = 0
        shrunk, gated = False, False  # (padded form: did the buffer ever get shorter, or images skip parts)
        self.tables, side_uses = _side_tables(gm, info)
        self.needs_positions = bool(self.tables) and bool(plan)
        if self.needs_positions:  # original positions, to index the tables for each image's tokens
            first = info.blocks[0].x_in
            state.pos = _Inserter(gm, first.next, 0, "")(tk.token_positions.default, first, info.num_tokens,
                                                        role="tokens.pos")
        halting = any(d.site == "post_block" for d in plan)
        if self.dense and plan:
            if self.mode == "packed" and not halting:
                raise RewriteError("dense=True restores the token grid from padded or masked tokens; packed tokens "
                                   "have no per-image rows to restore: use mode='padded'")
            first = info.blocks[0].x_in
            state.home = _Inserter(gm, first.next, 0, "")(tk.token_home.default, first, info.num_tokens,
                                                         role="tokens.home")
        for blk in info.blocks:
            if state.changed:
                for node, arg, table, axis, offset, rank in side_uses.get(blk.index, []):
                    ins = _Inserter(gm, node, blk.index, "")
                    node.update_arg(arg, ins(tk.side_gather.default, table, state.pos, axis, offset, rank,
                                             role="tokens.side"))
            att_decisions = by_site.get((blk.index, "attn"), [])
            here = [d for site in SITES for d in by_site.get((blk.index, site), [])]
            sites = [d.site for d in here]
            if len({d.policy for d in here}) > 1 or len(set(sites)) < len(sites):
                # the second would need this block's keys for the first one's tokens
                raise RewriteError(
                    f"block {blk.index}: {len(here)} policies decide in the same block "
                    f"({', '.join(d.policy for d in here)}); give them different blocks=, e.g. prune at "
                    "block 3 and merge from block 4 on")
            gate = None
            for d in by_site.get((blk.index, "pre_block"), []):
                gate = self._pre_block_site(gm, info, blk, state, d)
            if gate is not None:
                if att_decisions:
                    raise RewriteError(f"block {blk.index}: {att_decisions[0].policy} decides inside attention, which "
                                       "gated blocks do not support")
                self._gated_block(gm, blk, state, gate, by_site[(blk.index, "pre_block")][0].policy)
                decided += 1
                gated = True
            elif att_decisions:
                decided += self._attn_site(gm, info, blk, state, att_decisions[0])
            else:
                self._attend(gm, blk, state)
            x = blk.attn_add
            for d in by_site.get((blk.index, "post_attn"), []):
                x, n = self._post_attn_site(gm, info, blk, state, d, x)
                decided += n
            for d in by_site.get((blk.index, "post_block"), []):
                decided += self._post_block_site(gm, info, blk, state, d)
            state.changed = state.changed or decided > 0
            shrunk = shrunk or state.packed or state.length < info.num_tokens
            counts[blk.index] = state.active
            if state.count is not None:
                count_nodes[blk.index] = ("cu" if state.packed else "valid", state.count.name)
        if self.halting and state.grid is None:
            raise RewriteError("adaptive halting must end at the model's last block (every token halts there); "
                               f"its last halting block is {max(h['block'] for h in self.halting)}")
        if state.grid is not None:
            pass  # the head already reads the accumulated outputs
        elif decided and self.dense:
            self._restore_grid(gm, info, state)
        elif decided:
            self._rewire_head(gm, info, state)
        if decided:
            from tokenopt.passes.retarget import retarget_token_sizes

            retarget_token_sizes(gm)
        # the per-block count nodes stay (token_counts and explain read them), even past the last reader
        keep = {name for _kind, name in count_nodes.values()}
        keep |= {d[k] for d in self.decisions for k in ("idx", "valid", "slot", "heads", "attn", "mlp") if d.get(k)}
        keep |= {h[k] for h in self.halting for k in ("score", "rho", "active")}
        keep |= {name for names in self.aux.values() for name in names}
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.name in keep or n.is_impure())
        gm.meta["tokenopt.count_nodes"] = count_nodes
        gm.meta["tokenopt.decisions"] = self.decisions
        gm.meta["tokenopt.halting"] = self.halting
        gm.meta["tokenopt.aux"] = self.aux
        if decided and self.mode == "padded" and not (shrunk or gated):
            import warnings

            fix = ("dense=True needs that buffer, so for a model whose output is every token use a policy "
                   "with one count per batch (tome, topk, dynamicvit)" if self.dense else
                   "Use mode='packed', or a policy with one count per batch (tome, topk, dynamicvit)")
            warnings.warn(
                f"{plan[0].policy}: mode='padded'{' (what dense=True runs)' if self.dense else ''} keeps each "
                "image's tokens in a buffer of the full length, where the tokens this policy drops per image "
                f"are only masked: the output is right, but no work is saved. {fix}", stacklevel=4)
        if self._untrained:
            import warnings

            names = ", ".join(self._untrained[:3]) + (f" and {len(self._untrained) - 3} more" if len(self._untrained) > 3 else "")
            warnings.warn(f"no trained weights for {names} (policy_state=...): they run with their initial weights; "
                          "pass the policy_state saved by training", stacklevel=4)
        if self._unused_state:
            raise RewriteError(f"policy_state has weights this graph does not use: {', '.join(sorted(self._unused_state)[:4])}"
                               f"{' ...' if len(self._unused_state) > 4 else ''}; pass the state saved by training the "
                               "same policy on the same model")
        gm.meta.setdefault("tokenopt.counters", {})[self.pass_name] = {
            "mode": self.mode, "decisions": decided, "tokens": counts,
            "blocks": sorted({d.block for d in plan}),
        }
        return PassResult(gm, decided > 0)

    # -- learned policies' modules -------------------------------------------------------------------
    def policy_module(self, gm, policy: str, name: str, factory, like: torch.Tensor) -> str:
        container = f"tokenopt_{policy}"
        if not hasattr(gm, container):
            gm.add_submodule(container, torch.nn.Module())
        holder = gm.get_submodule(container)
        target = f"{container}.{name}"
        if not hasattr(holder, name):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the same initial weights in every process (DDP) and every build
                module = factory()
            prefix = target + "."
            given = {k[len(prefix):]: v for k, v in (self.policy_state or {}).items() if k.startswith(prefix)}
            if given:
                module.load_state_dict(given, strict=True)
                self._unused_state -= {prefix + k for k in given}
            elif not self.training:
                self._untrained.append(target)
            # in the model's dtype too: a float64 or float16 model gets predictors it can feed
            dtype = like.dtype if like.is_floating_point() else None
            holder.add_module(name, module.to(device=like.device, dtype=dtype))
        return target

    # -- attention over the current tokens -----------------------------------------------------------
    def _attend(self, gm, blk: BlockInfo, state: TokenState, q: Optional[fx.Node] = None,
                cu_q: Optional[fx.Node] = None, cap_q: Optional[int] = None, policy: str = "",
                pos_q: Optional[fx.Node] = None) -> None:
        att = blk.attention
        if state.soft is not None:  # a Mask (training form): DynamicViT's attention with a soft key mask
            mask = att.attn_mask
            mask_val = P.val(mask) if mask is not None else None
            bool_mask = mask_val is not None and mask_val.dtype == torch.bool
            if att.kind != "sdpa" or bool_mask or q is not None:
                raise RewriteError(
                    f"block {blk.index} ({blk.module_path}): attention {att.core.name} is not a plain SDPA (with at "
                    "most an additive model mask, such as a relative-position bias), so the training mask cannot "
                    "be applied to it; train with the mask before this block only (blocks=)")
            ins = _Inserter(gm, att.core, blk.index, policy)
            # a model mask (relative-position bias) stays part of the logits the soft mask weighs
            new = ins(tk.policy_attention.default, att.q, att.k, att.v, state.soft, att.scale, mask,
                      role="attn.core")
            new.meta["val"] = att.core.meta.get("val")
            att.core.replace_all_uses_with(new)
            gm.graph.erase_node(att.core)
            att.core, att.kind = new, "policy"
            return
        if state.packed or cu_q is not None:
            if att.kind == "manual" and att.head_mix:
                fix = ("a policy with one token count per batch (tome, pitome, topk) in mode='padded'"
                       if _mixes_after(att) else "mode='padded'")
                raise RewriteError(
                    f"block {blk.index} ({blk.module_path}): attention {att.core.name} mixes its heads around the "
                    f"softmax (talking heads), which packed attention does not compute. Fix: {fix}")
            if att.kind != "sdpa" or att.attn_mask is not None:
                raise RewriteError(
                    f"block {blk.index} ({blk.module_path}): attention {att.core.name} is not a plain SDPA "
                    "without a model mask, so it cannot run over packed tokens; use mode='padded'")
            ins = _Inserter(gm, att.core, blk.index, policy)
            new = ins(tk.varlen_attention.default, q if q is not None else att.q, att.k, att.v,
                      cu_q if cu_q is not None else state.cu, state.cu, cap_q or state.cap,
                      state.cap if state.packed else state.length,
                      att.scale, None if state.packed else state.bias, role="attn.core")
            new.meta["val"] = att.core.meta.get("val")  # the captured shape: retargeting reads it
            att.core.replace_all_uses_with(new)
            gm.graph.erase_node(att.core)
            att.core, att.kind = new, "varlen"
            return
        if q is not None:
            att.core.update_arg(0, q)
        mask = att.attn_mask
        if mask is not None and mask in self.tables and (state.changed or pos_q is not None):
            # a relative-position bias sized N x N: each image's entries for its current tokens
            ins = _Inserter(gm, att.core, blk.index, policy)
            table, v = mask, P.val(mask)
            batch = P.val(get_model_info(gm).image_input).shape[0]
            if v is not None and v.dim() == 4 and str(v.shape[0]) == str(batch) and v.shape[0] != 1:
                # expanded over the batch (Hugging Face's BEiT adds its expanded attention mask); the
                # table does not read the image, so every row of that axis is the same one
                table = ins(aten.select.int, mask, 0, 0)
            pm = ins(tk.pair_gather.default, table, pos_q if pos_q is not None else state.pos, state.pos,
                     role="tokens.side")
            bias = pm if state.bias is None else ins(aten.add.Tensor, pm, state.bias, role="tokens.bias")
            P.set_sdpa_mask(att.core, bias)
            _settle_layout(gm, att.core, blk.index)
            return
        if state.bias is not None:
            if att.kind == "manual" and att.head_mix:  # talking heads: a manual chain, biased in its logits
                _refuse_padding_after_mixing(att, state, f"block {blk.index} ({blk.module_path}): attention "
                                             f"{att.core.name}", ", or reduce tokens only in blocks after it (blocks=...)")
                _bias_logits(_Inserter(gm, att.softmax, blk.index, policy), att, state.bias)
                return
            if att.kind != "sdpa":
                raise RewriteError(
                    f"block {blk.index} ({blk.module_path}): attention {att.core.name} is a manual chain whose "
                    "intermediate results are used elsewhere, so the token bias cannot be added. Fix: "
                    + self._blocks_after_fix(gm))
            if att.attn_mask is not None:
                raise RewriteError(
                    f"block {blk.index} ({blk.module_path}): attention {att.core.name} already takes a mask from "
                    "the model, sized for the full token count (not a table tokenopt indexes by position). Fix: "
                    + self._blocks_after_fix(gm))
            P.set_sdpa_mask(att.core, state.bias)
            _settle_layout(gm, att.core, blk.index)

    def _blocks_after_fix(self, gm: fx.GraphModule) -> str:
        """The fix for attention that cannot take a token bias (a model mask that is not a table tokenopt
        indexes, a manual chain used elsewhere): reduce only after the last such block, or, when the last
        block has one too, run the model unreduced."""
        blocks = get_model_info(gm).blocks
        stuck = [b.index for b in blocks
                 if b.attention.attn_mask is not None and b.attention.attn_mask not in self.tables
                 or b.attention.kind == "manual" and not b.attention.head_mix]
        if stuck and stuck[-1] == blocks[-1].index:
            return (f"none here: the last block ({stuck[-1]}) has such attention too ({len(stuck)} of "
                    f"{len(blocks)} blocks do), so no block can be reduced ahead of the head; policy='none' "
                    "runs the model as captured")
        first = stuck[-1] + 1 if stuck else 0
        return f"reduce tokens only in blocks {first} to {blocks[-1].index} (blocks=range({first}, {len(blocks)}))"

    # -- sites ---------------------------------------------------------------------------------------
    def _decide(self, gm, info, blk, state, d: PlannedDecision, anchor, x):
        ctx = DecisionContext(self, gm, info, blk, state, d.site, anchor, x, d.policy)
        decision = d.decide(ctx)
        if decision is not None and not isinstance(decision, (Keep, Merge, Halt, Mask, Gate)):
            raise RewriteError(f"{d.policy}: a decision must be tokenopt.ir.Keep, Merge, Halt, Mask, Gate or None; got "
                               f"{type(decision).__name__}")
        if (isinstance(decision, Gate)) != (d.site == "pre_block") and decision is not None:
            raise RewriteError(f"{d.policy}: Gate decisions are made on the block input (site 'pre_block') and are "
                               f"the only ones made there; got a {type(decision).__name__} at site {d.site!r}")
        if isinstance(decision, (Halt, Mask)) and d.site != "post_block":
            raise RewriteError(f"{d.policy}: {type(decision).__name__} decisions are made at the block output (site "
                               f"'post_block') and only there; got one at site {d.site!r}")
        if isinstance(decision, Mask) and self.mode != "masked":
            raise RewriteError(f"{d.policy}: a Mask is the training form of a decision, realised masked only "
                               f"(prepare_training); this graph is {self.mode!r}")
        if isinstance(decision, Keep):
            self.decisions.append({"block": blk.index, "kind": "keep", "idx": decision.idx.name,
                                   "valid": decision.valid.name if decision.valid is not None else None})
        elif isinstance(decision, Merge):
            self.decisions.append({"block": blk.index, "kind": "merge", "slot": decision.slot.name})
        elif isinstance(decision, Gate):
            self.decisions.append({"block": blk.index, "kind": "gate", **{
                part: getattr(decision, part).name for part in ("heads", "attn", "mlp") if getattr(decision, part) is not None}})
        return decision, ctx.call

    def _pre_block_site(self, gm, info, blk, state, d) -> Optional[Gate]:
        """A Gate decided on the block input: its nodes go before the first node of the block."""
        x = _skip_of(blk.attn_add, blk.attn_branch)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        inside = set(blk.nodes)
        first = min((u for u in x.users if u in inside), key=order.__getitem__)
        decision, _ = self._decide(gm, info, blk, state, d, first, x)
        if decision is None or all(getattr(decision, p) is None for p in ("heads", "attn", "mlp")):
            return None
        if self.needs_positions:
            raise RewriteError(f"block {blk.index}: {d.policy} gates parts of blocks, which is not combined with "
                               "rotary or relative-position tables yet; use it on a ViT with absolute positions")
        if state.size is not None and state.proportional:
            raise RewriteError(f"block {blk.index}: {d.policy} gates parts of a block after a merge with proportional "
                               "attention, which is not supported; gate before merging")
        return decision

    def _gated_block(self, gm, blk: BlockInfo, state: TokenState, gate: Gate, policy: str) -> None:
        """Realise a Gate. Masked: every part runs and its output is scaled by its gate (training form).
        Padded / packed: a sub-layer runs on the images whose gate is on (gathered, then added back into
        the residual stream by index); attention computes only the heads that are on."""
        att = blk.attention
        masked = self.mode == "masked"
        if gate.heads is not None and not masked and (att.kind != "sdpa" or att.attn_mask is not None):
            raise RewriteError(
                f"block {blk.index} ({blk.module_path}): attention {att.core.name} is not a plain SDPA without a "
                "model mask, so heads cannot be skipped in it; gate sub-layers only (heads=False)")
        sub, images = state, None
        if gate.attn is not None and not masked:
            blk.attn_add, rows, images, cu = self._run_images(gm, blk, state, gate.attn, blk.attn_add,
                                                              blk.attn_branch, policy)
            blk.x_mid = blk.attn_add
            sub = replace(state, cu=cu if state.packed else None)
            if state.bias is not None:
                sub.bias = _Inserter(gm, att.core, blk.index, policy)(aten.index_select.default, state.bias, 0, images)
        if gate.heads is not None and not masked:
            ins = _Inserter(gm, att.core, blk.index, policy)
            heads = gate.heads if images is None else ins(aten.index_select.default, gate.heads, 0, images)
            new = ins(tk.head_attention.default, att.q, att.k, att.v, heads, att.scale,
                      None if sub.packed else sub.bias, sub.cu, sub.cap if sub.packed else 0, role="attn.core")
            new.meta["val"] = att.core.meta.get("val")
            att.core.replace_all_uses_with(new)
            gm.graph.erase_node(att.core)
            att.core, att.kind = new, "heads"
        else:
            self._attend(gm, blk, sub, policy=policy)
        if gate.heads is not None and masked:
            core = att.core
            ins = _Inserter(gm, core.next, blk.index, policy)
            b, h = ins(aten.sym_size.int, gate.heads, 0), ins(aten.sym_size.int, gate.heads, 1)
            w = ins(aten._to_copy.default, ins(aten.view.default, gate.heads, [b, h, 1, 1]), dtype=P.val(core).dtype)
            scaled = ins(aten.mul.Tensor, core, w, role="attn.core")
            core.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
        for run, attr in ((gate.attn, "attn"), (gate.mlp, "mlp")):
            if run is None or attr == "attn" and not masked:
                continue
            add, branch = getattr(blk, f"{attr}_add"), getattr(blk, f"{attr}_branch")
            if masked:
                ins = _Inserter(gm, add, blk.index, policy)
                w = ins(aten._to_copy.default, ins(aten.view.default, run, [ins(aten.sym_size.int, run, 0), 1, 1]),
                        dtype=P.val(branch).dtype)
                add.replace_input_with(branch, ins(aten.mul.Tensor, branch, w))
            else:
                new_add, *_ = self._run_images(gm, blk, state, run, add, branch, policy)
                blk.mlp_add = blk.x_out = new_add

    def _run_images(self, gm, blk: BlockInfo, state: TokenState, run: fx.Node, add: fx.Node, branch: fx.Node, policy):
        """Run the residual branch ``add = x + branch`` on the images whose gate ``run`` is on: its input is
        gathered (``gate_rows``: images, or their packed rows; ``take_rows``) and its output added back by index
        (``add_rows``); when every image runs it, neither gathers nor scatters."""
        x = _skip_of(add, branch)
        inside = set(blk.nodes)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        readers = [u for u in x.users if u is not add and u in inside]
        first = min(readers, key=order.__getitem__)
        ins = _Inserter(gm, first, blk.index, policy)
        rows, images, cu = ins.items(ins(tk.gate_rows.default, run, state.cu if state.packed else None, role="gate.rows"),
                                     3, roles=("gate.rows", "gate.images", None))
        dim = 1 if state.packed else 0
        x_sel = ins(tk.take_rows.default, x, dim, rows)
        for u in readers:
            u.replace_input_with(x, x_sel)
        ins.anchor = add
        new_add = ins(tk.add_rows.default, x, dim, rows, branch)
        new_add.meta["val"] = add.meta.get("val")
        add.replace_all_uses_with(new_add)
        gm.graph.erase_node(add)
        return new_add, rows, images, cu

    def _attn_site(self, gm, info, blk, state, d) -> int:
        att = blk.attention
        if att.kind != "sdpa":
            why = ("mixes its heads around the softmax (talking heads), which one SDPA node cannot express"
                   if att.head_mix else "is a manual chain canonicalize_attention could not rewrite (its "
                   "intermediate results are used elsewhere)")
            raise RewriteError(
                f"block {blk.index} ({blk.module_path}): {d.policy} decides inside attention, reading it from "
                f"one SDPA node, but attention {att.core.name} {why}. Fix: policy='tome' or 'pitome' (they "
                "decide after attention), or blocks= without this block")
        decision, ins = self._decide(gm, info, blk, state, d, att.core, None)
        if decision is None:
            self._attend(gm, blk, state)
            return 0
        if not isinstance(decision, Keep) or decision.extra is not None:
            raise RewriteError(f"block {blk.index}: inside attention only Keep decisions without extra tokens "
                               f"are realised; {d.policy} returned {type(decision).__name__}")
        ins.anchor = att.core
        old = replace(state)  # the state the keys and values were computed in
        if self.mode == "packed" and decision.valid is not None or state.packed:
            flat, cu = self._pack(ins, decision, state, d)
            q_sel = ins(tk.gather_rows.default, att.q, flat)
            self._attend(gm, blk, old, q=q_sel, cu_q=cu, cap_q=state.cap, policy=d.policy)
            ins.anchor = blk.attn_add
            x_sel = ins(tk.gather_rows.default, blk.x_in, flat)
            blk.attn_add.replace_input_with(blk.x_in, x_sel)
            return 1
        idx, valid, width = self._widen(ins, decision, state)
        self._track_keep(ins, state, blk.x_in, idx, valid)
        q_sel = ins(tk.gather_tokens.default, att.q, idx, 2)
        pos_q = ins(tk.gather_tokens.default, state.pos, idx, 1) if state.pos is not None else None
        self._attend(gm, blk, old, q=q_sel, pos_q=pos_q)
        ins.anchor = blk.attn_add
        x_sel = ins(tk.gather_tokens.default, blk.x_in, idx, 1)
        blk.attn_add.replace_input_with(blk.x_in, x_sel)
        self._gather_state(ins, state, idx, valid, width, decision, pos=pos_q)
        return 1

    def _post_attn_site(self, gm, info, blk, state, d, x: fx.Node) -> tuple[fx.Node, int]:
        users = [u for u in x.users]
        anchor = x.next
        decision, ins = self._decide(gm, info, blk, state, d, anchor, x)
        if decision is None:
            return x, 0
        new_x = self._reduce(ins, blk, state, d, decision, x)
        for u in users:  # the block's own readers of x (norm2, the MLP residual) take the new tokens
            u.replace_input_with(x, new_x)
        return new_x, 1

    def _reduce(self, ins, blk, state: TokenState, d, decision, x: fx.Node) -> fx.Node:
        """Realise a Keep or Merge on the residual stream ``x``: returns the new stream."""
        if isinstance(decision, Merge):
            return self._merge(ins, state, decision, x, d)
        if self.mode == "packed" and decision.valid is not None or state.packed:
            if decision.extra is not None:
                raise RewriteError(f"block {blk.index}: {d.policy} appends tokens, which packed tokens do not "
                                   "support; use mode='padded'")
            flat, _cu = self._pack(ins, decision, state, d)
            return ins(tk.gather_rows.default, x, flat)
        idx, valid, width = self._widen(ins, decision, state)
        self._track_keep(ins, state, x, idx, valid)
        new_x = ins(tk.gather_tokens.default, x, idx, 1)
        return self._gather_state(ins, state, idx, valid, width, decision, x=new_x)

    def _post_block_site(self, gm, info, blk, state, d) -> int:
        """A decision on the block output: a Keep or Merge (the next block runs on the new tokens), a Mask
        (training form), or adaptive halting (accumulate, then drop (packed) or mask the halted tokens)."""
        x = blk.x_out
        users = list(x.users)
        decision, ins = self._decide(gm, info, blk, state, d, x.next, x)
        if decision is None:
            return 0
        if isinstance(decision, Mask):
            if state.bias is not None or state.valid is not None or state.packed or state.size is not None:
                raise RewriteError(f"block {blk.index}: {d.policy}'s training mask follows another reduction in the "
                                   "same graph, which is not supported; train it alone")
            state.soft = decision.keep
            return 1
        if isinstance(decision, (Keep, Merge)):
            if blk is info.blocks[-1]:
                raise RewriteError(f"block {blk.index}: {d.policy} reduces tokens after the last block, where no "
                                   "block runs on fewer tokens; choose earlier blocks")
            new_x = self._reduce(ins, blk, state, d, decision, x)
            for u in users:  # the next block (and anything else reading the block output) takes the new tokens
                u.replace_input_with(x, new_x)
            return 1
        if state.size is not None or self.needs_positions:
            raise RewriteError(f"block {blk.index}: {d.policy} halts tokens, which is not combined with merged "
                               "tokens or with rotary / relative-position tables yet; use it alone on a plain ViT")
        if self.mode == "packed":
            return self._halt_packed(ins, info, blk, state, d, decision, x, users)
        h = state.halt or {}  # (masked and padded forms keep every row: validity marks the running ones)
        step = ins(tk.act_step.default, x, decision.score, h.get("cum"), h.get("rem"), h.get("rho"), h.get("acc"),
                   state.valid, decision.eps, decision.last, role="halt.step")
        x_next, cum, rem, rho, acc, active = ins.items(
            step, 6, roles=(None, "halt.cum", "halt.rem", "halt.rho", "halt.acc", "halt.active"))
        state.halt = dict(cum=cum, rem=rem, rho=rho, acc=acc)
        self.halting.append({"block": blk.index, "score": decision.score.name, "rho": rho.name,
                             "active": active.name})
        if decision.last:  # every token has halted: the head reads the accumulated outputs
            grid = acc if state.home is None else ins(tk.dense_restore.default, acc, state.home, state.dense,
                                                       role="tokens.grid")
            for u in users:
                u.replace_input_with(x, grid)
            state.grid = grid
            return 1
        # masked (and padded: a static capacity cannot shrink): mask them out
        for u in users:
            u.replace_input_with(x, x_next)
        state.valid = active
        state.active = None
        state.bias = ins(tk.halt_bias.default, active, self.dtype, role="tokens.bias")
        return 1

    def _halt_packed(self, ins, info, blk, state, d, decision: Halt, x, users) -> int:
        """Packed halting: one ``halt_pack`` per block adds every running token's ACT term into an output
        grid ``[B, N0, C]`` (at the token's row there, ``home``) and packs the tokens still running."""
        h = state.halt or {}
        if not h and state.changed:
            raise RewriteError(
                f"block {blk.index}: {d.policy} halts tokens after an earlier reduction; packed halting starts "
                "from the model's own tokens. Use mode='padded', or halting alone")
        step = ins(tk.halt_pack.default, x, decision.score, h.get("cum"), h.get("rem"), h.get("rho"), h.get("grid"),
                   h.get("home"), state.cu, decision.eps, decision.last, info.num_tokens, role="halt.step")
        x_next, cum, rem, rho, grid, home, cu, longest, active = ins.items(
            step, 9, roles=(None, "halt.cum", "halt.rem", "halt.rho", "halt.acc", "tokens.home", "tokens.cu", None,
                            "halt.active"))
        self.halting.append({"block": blk.index, "score": decision.score.name, "rho": rho.name,
                             "active": active.name})
        new_x = grid if decision.last else x_next  # after the last one, the head reads the accumulated outputs
        for u in users:
            u.replace_input_with(x, new_x)
        if decision.last:
            state.grid = grid
            return 1
        state.halt = dict(cum=cum, rem=rem, rho=rho, grid=grid, home=home)
        state.cu, state.cap = cu, ins(aten.sym_size.int, longest, 0)
        state.active, state.valid, state.bias = None, None, None
        return 1

    # -- realising a Keep ----------------------------------------------------------------------------
    def _widen(self, ins, decision: Keep, state: TokenState):
        """``idx``/``valid`` of a dense Keep, widened to the buffer length in the masked form."""
        idx, valid, width = decision.idx, decision.valid, decision.width
        if self.mode == "masked" and decision.extra is None:
            target = state.length
            if width < target:
                pad = ins(tk.pad_indices.default, idx, valid, target)
                idx, valid = ins.items(pad, 2, roles=("tokens.idx", "tokens.valid"))
                width = target
        return idx, valid, width

    def _gather_state(self, ins, state: TokenState, idx, valid, width, decision: Keep, x=None, pos=None):
        """Dense gather of the state (validity, sizes) along with the tokens; returns x with extras.

        Layout after it: the kept tokens, then the decision's extra tokens, then (masked form only)
        padding up to the buffer length, so real tokens always form a prefix of each row.
        """
        if state.valid is not None:
            valid = ins(tk.gather_valid.default, state.valid, idx, valid, role="tokens.valid")
        size = ins(tk.gather_tokens.default, state.size, idx, 1, role="tokens.size") if state.size is not None else None
        if pos is None and state.pos is not None:  # (the attention site gathered it already)
            pos = ins(tk.gather_tokens.default, state.pos, idx, 1, role="tokens.pos")
        e = decision.extra_count
        length = width
        if decision.extra is not None:
            b = ins(aten.sym_size.int, x, 0)
            x = ins(aten.cat.default, [x, decision.extra], 1)
            if size is not None:
                one = ins(aten.new_ones.default, state.size, [b, e, 1])
                size = ins(aten.cat.default, [size, one], 1, role="tokens.size")
            if valid is not None:
                ones = ins(aten.new_ones.default, decision.idx, [b, e], dtype=torch.bool)
                valid = ins(aten.cat.default, [valid, ones], 1, role="tokens.valid")
            if pos is not None:  # an appended token has no place of its own: it reads position 0
                pos = ins(aten.cat.default, [pos, ins(aten.new_zeros.default, pos, [b, e])], 1, role="tokens.pos")
            length = width + e
            if self.mode == "masked" and length < state.length:  # pad after the extras
                pad = state.length - length
                x = ins(aten.constant_pad_nd.default, x, [0, 0, 0, pad])
                if size is not None:
                    size = ins(aten.constant_pad_nd.default, size, [0, 0, 0, pad])
                if valid is None:
                    valid = ins(aten.new_ones.default, decision.idx, [b, length], dtype=torch.bool)
                valid = ins(aten.constant_pad_nd.default, valid, [0, pad], 0.0, role="tokens.valid")
                if pos is not None:
                    pos = ins(aten.constant_pad_nd.default, pos, [0, pad], 0.0, role="tokens.pos")
                length = state.length
        adaptive = decision.valid is not None or state.active is None
        state.active = None if adaptive else decision.width + e
        state.length, state.valid, state.size, state.pos = length, valid, size, pos
        self._rebias(ins, state)
        return x

    def _pack(self, ins, decision: Keep, state: TokenState, d) -> tuple[fx.Node, fx.Node]:
        if self.needs_positions:
            raise RewriteError(
                f"block {d.block}: {d.policy} packs tokens, but this model indexes rotary or relative-position "
                "tables by token position, which packed tokens do not carry yet; use mode='padded'")
        if state.size is not None and state.proportional:
            raise RewriteError(
                f"block {d.block}: {d.policy} packs tokens after a merge with proportional attention, which "
                "packed attention does not carry; use mode='padded' or proportional_attention=False")
        valid = decision.valid
        if valid is None:
            valid = ins(aten.ones_like.default, decision.idx, dtype=torch.bool)
        if not state.packed and state.valid is not None:  # (packed tables' padding is already in valid)
            valid = ins(tk.gather_valid.default, state.valid, decision.idx, valid)
        packed = ins(tk.pack_index.default, decision.idx, valid, state.cu, state.length, role="tokens.pack")
        flat, cu, longest = ins.items(packed, 3, roles=("tokens.flat", "tokens.cu"))
        state.cap = ins(aten.sym_size.int, longest, 0)
        state.size = ins(tk.gather_rows.default, state.size, flat, role="tokens.size") if state.size is not None else None
        state.cu, state.length, state.active = cu, decision.width, None
        state.valid, state.bias = None, None
        return flat, cu

    # -- realising a Merge ---------------------------------------------------------------------------
    def _merge(self, ins, state: TokenState, decision: Merge, x: fx.Node, d) -> fx.Node:
        if state.packed or state.active is None:
            raise RewriteError(
                f"block {d.block}: {d.policy} merges tokens, which needs the same token count in every "
                "image, but an earlier adaptive decision made counts per image; merge before it (blocks=)")
        slots = state.length if self.mode == "masked" else decision.num_slots
        merged = ins(tk.merge_tokens.default, x, state.size, decision.slot, slots)
        new_x, size = ins.items(merged, 2, roles=(None, "tokens.size"))
        valid = None
        if self.mode == "masked" and slots > decision.num_slots:
            valid = ins(tk.slots_valid.default, decision.slot, slots, state.valid, role="tokens.valid")
        if state.pos is not None:
            if decision.rep is None:
                raise RewriteError(
                    f"block {d.block}: {d.policy} merges tokens without naming which token stands for each "
                    "merged one, but this model indexes rotary or relative-position tables by token position; "
                    "the policy's Merge needs rep=")
            state.pos = ins(tk.slot_positions.default, state.pos, decision.slot, decision.rep, slots, role="tokens.pos")
        if state.home is not None:  # every token a slot absorbed now lives in that slot's row
            row_map = ins(tk.slot_map.default, decision.slot, slots)
            state.home = ins(tk.follow_rows.default, state.home, row_map, role="tokens.home")
        state.length, state.active, state.size, state.valid = slots, decision.num_slots, size, valid
        state.proportional = state.proportional or decision.proportional
        self._rebias(ins, state)
        return new_x

    def _rebias(self, ins, state: TokenState) -> None:
        size = state.size if state.proportional else None
        if state.valid is None and size is None:
            state.bias = None
        else:
            state.bias = ins(tk.token_bias.default, state.valid, size, self.dtype, role="tokens.bias")

    # -- dense restore -------------------------------------------------------------------------------
    def _track_keep(self, ins, state: TokenState, x: fx.Node, idx, valid) -> None:
        """Before a Keep (dense=True): the tokens it drops keep their current value ``x`` in the grid."""
        if state.home is None:
            return
        state.dense = ins(tk.dense_restore.default, x, state.home, state.dense, role="tokens.dense")
        row_map = ins(tk.keep_map.default, idx, valid, state.length)
        state.home = ins(tk.follow_rows.default, state.home, row_map, role="tokens.home")

    def _restore_grid(self, gm, info: ModelInfo, state: TokenState) -> None:
        """After the last block: ``[B, N0, C]`` again, so the head runs on the grid it was built for."""
        last = info.blocks[-1].x_out
        users = list(last.users)
        grid = _Inserter(gm, last.next, info.blocks[-1].index, "")(
            tk.dense_restore.default, last, state.home, state.dense, role="tokens.grid")
        for u in users:
            u.replace_input_with(last, grid)

    # -- the head ------------------------------------------------------------------------------------
    def _rewire_pool(self, gm, ins, reader, state: TokenState) -> None:
        """A pooling query attends to the reduced tokens: padding masked, merged tokens weighted by size."""
        att = reader.attention
        mixed = att.kind == "manual" and att.head_mix
        if att.kind != "sdpa" and not mixed or att.attn_mask is not None:
            raise RewriteError(
                f"the pooling head's attention {att.core.name} is not a plain SDPA without a model mask, so it "
                "cannot be given the reduced tokens; use policy='none' for this model")
        ins.anchor = att.core
        extra = _keys_in_front(gm, att)
        if extra or mixed:  # CaiT: the class token's attention runs over cat([cls, x]), maybe talking heads
            if state.packed:
                raise RewriteError(
                    f"the head's attention {att.core.name} ({_module_path(att.core)}) runs over "
                    + (f"its own {extra} token(s) in front of the block tokens (class attention)" if extra else
                       "the tokens with its heads mixed around the softmax (talking heads)")
                    + ", which packed tokens cannot be laid out for. Fix: mode='padded'")
            if state.bias is None:
                return
            if mixed:  # the bias goes in before the softmax, as for a block's talking heads
                _refuse_padding_after_mixing(att, state, f"the head's attention {att.core.name} "
                                             f"({_module_path(att.core)})")
                ins.anchor = att.softmax
            bias = state.bias if not extra else ins(aten.constant_pad_nd.default, state.bias, [extra, 0], 0.0,
                                                    role="tokens.bias")
            if mixed:
                _bias_logits(ins, att, bias)
            else:
                P.set_sdpa_mask(att.core, bias)
            return
        if state.packed:  # the keys/values are packed: lay each image's out again
            # the longest image's count (state.cap) is known only at run time, and SDPA's shape rules
            # ask whether it is 0; the captured token count bounds it: one query over that many keys,
            # the padding masked, costs the head next to nothing
            cap = get_model_info(gm).num_tokens
            if not isinstance(cap, int):
                cap = state.cap
            k, valid = ins.items(ins(tk.unpack.default, att.k, state.cu, cap), 2)
            v, _ = ins.items(ins(tk.unpack.default, att.v, state.cu, cap), 2)
            size = None
            if state.size is not None and state.proportional:
                size, _ = ins.items(ins(tk.unpack.default, state.size, state.cu, cap), 2)
            bias = ins(tk.token_bias.default, valid, size, self.dtype, role="tokens.bias")
            att.core.update_arg(1, k)
            att.core.update_arg(2, v)
            P.set_sdpa_mask(att.core, bias)
        elif state.bias is not None:
            P.set_sdpa_mask(att.core, state.bias)

    def _rewire_head(self, gm, info: ModelInfo, state: TokenState) -> None:
        for reader in info.head_readers:
            ins = _Inserter(gm, reader.node, -1, "")
            if reader.kind == "token":
                if reader.index >= info.num_prefix_tokens:
                    raise RewriteError(
                        f"the head reads token {reader.index} (node {reader.node.name}), a patch token that token "
                        "reduction may drop or move; only prefix tokens (CLS, distillation, registers) stay in place")
                if state.packed:
                    new = ins(tk.packed_select.default, reader.node.args[0], state.cu, reader.index)
                    reader.node.replace_all_uses_with(new)
                continue
            if reader.kind == "attn_pool":
                self._rewire_pool(gm, ins, reader, state)
                continue
            if reader.kind == "mean":
                if state.valid is None and state.size is None and not state.packed:
                    continue  # a plain mean over the remaining tokens is what the model asked for
                mean = reader.node
                src = mean.args[0]
                tokens = src.args[0] if P.is_call(src, P.SLICE_OPS) else src
                if state.packed:
                    new = ins(tk.packed_mean.default, tokens, state.cu, state.size, reader.start, reader.end)
                else:
                    new = ins(tk.weighted_mean.default, tokens, state.valid, state.size, reader.start, reader.end)
                if P.val(mean) is not None and P.val(mean).dim() == 3:  # mean(keepdim=True)
                    new = ins(aten.unsqueeze.default, new, 1)
                mean.replace_all_uses_with(new)
                continue
            raise RewriteError(
                f"after the last block the model uses every token (node {reader.node.name}, {reader.kind}); "
                "token reduction would change that output's shape. Pass dense=True to restore the full token grid "
                "after the last block, or reduce tokens only in models whose head reads prefix tokens or pools "
                "over tokens")



def _skip_of(add: fx.Node, branch: fx.Node) -> fx.Node:
    """The skip operand of a residual ``add`` (the one that is not the branch)."""
    return next(a for a in add.args[:2] if a is not branch)


def _settle_layout(gm: fx.GraphModule, core: fx.Node, block: int) -> None:
    """Give attention that now takes a bias a layout-independent output.

    The model reads the attention output as ``transpose(1, 2)`` then a view. Eager SDPA lays its output
    out so that view is free; its decomposed form (what ONNX export lowers a biased SDPA to) does
    not, and the view then fails. A contiguous copy right after the transpose makes the view valid
    whatever the layout; in eager it is the one copy the view would otherwise have saved.
    """
    users = list(core.users)
    after = users[0] if len(users) == 1 and P.is_call(users[0], P.TRANSPOSE_OPS) else core
    if any(P.is_call(u, {aten.clone.default}) for u in after.users):
        return
    with gm.graph.inserting_after(after):
        copy = gm.graph.call_function(aten.clone.default, (after,), {"memory_format": torch.contiguous_format})
    stamp(copy, block=block, **{"pass": "realize_tokens"})
    copy.meta["val"] = after.meta.get("val")  # the captured shape: retargeting reads it
    after.replace_all_uses_with(copy, delete_user_cb=lambda u: u is not copy)


_ELEMENTWISE = P.MUL_OPS | P.ADD_OPS | P.DIV_OPS | {torch.ops.aten.sub.Tensor}


def _side_tables(gm: fx.GraphModule, info: ModelInfo):
    """Tables indexed by token position that the blocks read: rotary tables (``[N, D]`` or ``[Np, D]``,
    multiplied into q/k: EVA-02, RoPE ViTs) and relative-position biases (``[..., N, N]`` attention masks
    the model computes from parameters: BEiT, relpos ViTs). Found by pattern: an image-independent
    tensor meeting token data in an elementwise op along an axis of the token count, or an
    image-independent SDPA mask whose last two axes are the token count.

    Returns ``(tables, uses)``: the set of table nodes, and per block the uses to rewire as
    ``(node, arg index, table, token axis from the right, offset, rank of the other operand)``.
    """
    from tokenopt.passes.find_blocks import image_dependent_nodes

    image_dep = image_dependent_nodes(gm)
    n, n_patch = info.num_tokens, info.num_patch_tokens
    tables: set = set()
    uses: dict[int, list] = {}
    for blk in info.blocks:
        mask = blk.attention.attn_mask
        mv = P.val(mask)
        if mask is not None and mask not in image_dep and mv is not None and mv.dim() >= 2 \
                and tuple(mv.shape[-2:]) == (n, n) and mv.is_floating_point():
            tables.add(mask)
        for node in blk.nodes:
            if not P.is_call(node, _ELEMENTWISE) or len(node.args) < 2:
                continue
            for i, (t, other) in enumerate(((node.args[0], node.args[1]), (node.args[1], node.args[0]))):
                tv, ov = P.val(t), P.val(other)
                if (tv is None or ov is None or t in image_dep or other not in image_dep or tv.dim() < 2
                        or ov.dim() < tv.dim()):
                    continue
                for axis in range(-tv.dim(), 0):
                    size = tv.shape[axis]
                    if isinstance(size, int) and size in (n, n_patch) and size > 1 and ov.shape[axis] == size:
                        uses.setdefault(blk.index, []).append((node, i, t, axis, n - size, ov.dim()))
                        tables.add(t)
                        break
    return tables, uses
