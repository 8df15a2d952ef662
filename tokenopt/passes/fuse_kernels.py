"""fuse_kernels: replace the reference token-op chains the policy passes inserted by fused kernels.

The policy passes build every token op from plain-PyTorch references
(:mod:`tokenopt.kernels.reference`): on a GPU each is a handful of small launches. This pass finds
those chains by their targets and the way they feed each other, and swaps each for one
``torch.ops.tokenopt.*`` custom op (:mod:`tokenopt.kernels.ops`, Triton inside):

===================================================================  ==================================
chain (reference ops)                                                custom op
===================================================================  ==================================
``cls_attention -> ats_scores -> ats_select`` (bias from ``valid``)  ``tokenopt.ats_select_dense``
``packed_cls_scores -> ats_scores_from_norms -> ats_select``          ``tokenopt.ats_select_packed``
``cls_attention -> topk_select -> gather_tokens [-> evit_fuse, cat]`` ``tokenopt.topk_gather``
``mean(k, heads) -> tome_match -> tome_merge``                        ``tokenopt.tome_merge``
``varlen_attention`` / ``gather_packed`` / ``unpack_padded`` /         the op of the same name
``gather_tokens``
===================================================================  ==================================

A chain is fused only when its intermediate values have no other users (the fused op does not
produce them); anything left unmatched keeps running its reference, so the pass never changes what
the graph computes, only how.

``backend``: ``"auto"`` fuses when the graph's parameters are on CUDA and Triton is importable, and
otherwise leaves the reference path (the CPU path: the Triton kernels only run on CPU through the
slow interpreter); ``"triton"`` always fuses (tests use it with ``TRITON_INTERPRET=1``);
``"reference"`` never does.

Writes: ``gm.meta["tokenopt.counters"]["fuse_kernels"] = {"backend": ..., "fused": {op: count}}``;
each new node inherits the replaced node's ``block`` and role and gets provenance ``pass=fuse_kernels``.

Example:
    >>> import timm, tokenopt
    >>> model = timm.create_model("deit_tiny_patch16_224", depth=4).eval()
    >>> gm = tokenopt.optimize(model, policy="topk", kernels="triton")
    >>> gm.meta["tokenopt.counters"]["fuse_kernels"]["fused"]
    {'topk_gather': 1}
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import META_BLOCK, META_ROLE, stamp
from tokenopt.kernels import reference as ref

__all__ = ["FuseKernels", "fuse_kernels", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")
aten = torch.ops.aten


def resolve_backend(backend: str, gm: fx.GraphModule) -> str:
    """``"triton"`` or ``"reference"`` for ``gm``; ``"auto"`` picks Triton for CUDA graphs when it imports."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    from tokenopt.kernels.ops import triton_available

    on_cuda = any(p.is_cuda for p in gm.parameters()) or any(b.is_cuda for b in gm.buffers())
    return "triton" if on_cuda and triton_available() else "reference"


def _only_users(node: fx.Node, allowed: set) -> bool:
    return all(u in allowed for u in node.users)


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


@dataclass
class FuseKernels:
    """The pass; see the module docstring. ``backend``: ``"auto"``, ``"triton"`` or ``"reference"``."""

    backend: str = "auto"
    pass_name = "fuse_kernels"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        backend = resolve_backend(self.backend, gm)
        fused: Counter = Counter()
        if backend == "triton":
            from tokenopt.kernels import ops  # registers torch.ops.tokenopt.*

            self.ops = torch.ops.tokenopt
            for node in list(gm.graph.nodes):
                if node._erased or node.op != "call_function":
                    continue  # erased by an earlier match
                for name, rule in self._RULES:
                    if node.target is rule[0] and getattr(self, name)(gm, node):
                        fused[rule[1]] += 1
                        break
            gm.recompile()  # also when run on its own, outside a Pipeline
        gm.meta.setdefault("tokenopt.counters", {})[self.pass_name] = {"backend": backend, "fused": dict(fused)}
        return PassResult(gm, bool(fused))

    # ---- helpers ----------------------------------------------------------------------------------

    def _replace(self, gm: fx.GraphModule, old: fx.Node, op, args: tuple, dead: tuple = ()) -> fx.Node:
        with gm.graph.inserting_before(old):
            new = gm.graph.call_function(op, args)
        stamp(new, block=old.meta.get(META_BLOCK), **{"pass": self.pass_name})
        if META_ROLE in old.meta:
            new.meta[META_ROLE] = old.meta[META_ROLE]
        old.replace_all_uses_with(new)
        for n in (old, *dead):  # in use order: a node goes once the ones reading it are gone
            if isinstance(n, fx.Node) and not n._erased and not n.users:
                gm.graph.erase_node(n)
        return new

    # ---- rules: (method, (anchor target, counter name)) -------------------------------------------

    def _ats_dense(self, gm, sel):
        scores, k_samples, min_tokens, p, valid = sel.args
        if not _is(scores, ref.ats_scores) or len(scores.users) != 1:
            return False
        cls, v, _, _ = scores.args
        if not _is(cls, ref.cls_attention) or len(cls.users) != 1:
            return False
        q, k, scale, bias = (list(cls.args) + [None])[:4]
        if bias is not None and not (_is(bias, ref.valid_to_bias) and bias.args[0] is valid):
            return False  # some other bias (e.g. ToMe sizes) on the CLS row: keep the reference
        self._replace(gm, sel, self.ops.ats_select_dense.default,
                      (q, k, v, scale, p, k_samples, min_tokens, valid), dead=(scores, cls, bias))
        return True

    def _ats_packed(self, gm, sel):
        scores, k_samples, min_tokens, p, _ = sel.args
        if not _is(scores, ref.ats_scores_from_norms) or len(scores.users) != 1:
            return False
        parts = scores.args[0], scores.args[1], scores.args[3]
        if not all(_is(n, operator.getitem) for n in parts):
            return False
        packed = parts[0].args[0]
        if not _is(packed, ref.packed_cls_scores) or any(n.args[0] is not packed for n in parts):
            return False
        if not all(_only_users(n, {scores, sel}) for n in parts):
            return False
        q, k, v, cu, scale = packed.args
        self._replace(gm, sel, self.ops.ats_select_packed.default,
                      (q, k, v, cu, scale, p, k_samples, min_tokens), dead=(scores, *parts, packed))
        return True

    def _topk(self, gm, gather):
        x, idx = gather.args[0], gather.args[1]
        dim = gather.args[2] if len(gather.args) > 2 else 1
        if dim != 1 or not _is(idx, ref.topk_select):
            return False
        cls, keep, p = idx.args
        if not _is(cls, ref.cls_attention):
            return False
        q, k, scale, bias = (list(cls.args) + [None])[:4]
        anchor, fuse, dead = gather, False, [gather, idx, cls]
        evits = [u for u in idx.users if _is(u, ref.evit_fuse)]
        if evits:  # EViT's fused token appended: cat([gather, evit_fuse(...)], 1)
            evit = evits[0]
            cats = [u for u in gather.users if _is(u, aten.cat.default)]
            if len(evits) != 1 or len(cats) != 1 or list(cats[0].args[0]) != [gather, evit] or evit.args[0] is not x:
                return False
            anchor, fuse, dead = cats[0], True, [cats[0], gather, evit, idx, cls]
            if not (_only_users(gather, {anchor}) and _only_users(evit, {anchor})):
                return False
        elif not _only_users(gather, set(gather.users)) or len(idx.users) != 1:
            return False
        if not _only_users(cls, set(dead)) or not _only_users(idx, set(dead)):
            return False
        self._replace(gm, anchor, self.ops.topk_gather.default, (x, q, k, scale, keep, p, fuse, bias),
                      dead=tuple(dead[1:]))
        return True

    def _tome(self, gm, merge):
        x, size, unm, src, dst, p = merge.args
        parts = (unm, src, dst)
        if not all(_is(n, operator.getitem) for n in parts):
            return False
        match = unm.args[0]
        if not _is(match, ref.tome_match) or any(n.args[0] is not match for n in parts):
            return False
        metric, r, _ = match.args
        if not (_is(metric, aten.mean.dim) and list(metric.args[1]) == [1]) or len(metric.users) != 1:
            return False
        if not all(_only_users(n, {merge}) for n in parts):
            return False
        self._replace(gm, merge, self.ops.tome_merge.default, (x, metric.args[0], size, r, p),
                      dead=(*parts, match, metric))
        return True

    def _one_to_one(self, gm, node):
        op = getattr(self.ops, node.target.__name__).default
        args = tuple(node.args)
        if node.target is ref.gather_tokens and len(args) == 2:
            args = args + (1,)
        if node.target is ref.varlen_attention and len(args) < 6:
            return False
        self._replace(gm, node, op, args)
        return True

    _RULES = (
        ("_ats_dense", (ref.ats_select, "ats_select_dense")),
        ("_ats_packed", (ref.ats_select, "ats_select_packed")),
        ("_topk", (ref.gather_tokens, "topk_gather")),
        ("_tome", (ref.tome_merge, "tome_merge")),
        ("_one_to_one", (ref.varlen_attention, "varlen_attention")),
        ("_one_to_one", (ref.gather_packed, "gather_packed")),
        ("_one_to_one", (ref.unpack_padded, "unpack_padded")),
        ("_one_to_one", (ref.gather_tokens, "gather_tokens")),
    )


def fuse_kernels(gm: fx.GraphModule, backend: str = "auto") -> PassResult:
    """Run :class:`FuseKernels` on ``gm``."""
    return FuseKernels(backend)(gm)
