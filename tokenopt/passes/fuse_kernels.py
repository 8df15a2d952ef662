"""fuse_kernels: replace the reference token-op chains the policy passes inserted by fused kernels.

The realisation pass builds every token step from the reference ops ``torch.ops.tokenopt.*``
(:mod:`tokenopt.kernels.ops`, plain PyTorch inside). This pass finds chains of them by their targets
and the way they feed each other, and swaps each for one Triton op ``torch.ops.tokenopt.triton_*``
(:mod:`tokenopt.kernels.fused`):

=========================================================================  ============================
chain (reference ops)                                                      Triton op
=========================================================================  ============================
``cls_attention -> topk_select -> gather_tokens [-> evit_fuse, cat]``      ``triton_topk_gather``
``mean(k, heads) -> tome_slots -> merge_tokens``                           ``triton_tome_merge``
``varlen_attention`` (no key bias)                                         ``triton_varlen_attention``
``gather_rows``                                                            ``triton_gather_packed``
``gather_tokens``                                                          ``triton_gather_tokens``
=========================================================================  ============================

ATS selection stays on its reference ops: its Triton kernels pad to the batch's largest count (a
host read), the graph pads to a static capacity; a capacity-width kernel is future work.

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
    {'triton_topk_gather': 1}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

import tokenopt.kernels.ops  # noqa: F401  (registers torch.ops.tokenopt.*)
from tokenopt.ir import META_BLOCK, META_ROLE, stamp

__all__ = ["FuseKernels", "fuse_kernels", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "reference")
aten = torch.ops.aten
tk = torch.ops.tokenopt


def resolve_backend(backend: str, gm: fx.GraphModule) -> str:
    """``"triton"`` or ``"reference"`` for ``gm``; ``"auto"`` picks Triton for CUDA graphs when it imports."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "triton":
        import os

        on_cuda = any(p.is_cuda for p in gm.parameters()) or any(b.is_cuda for b in gm.buffers())
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='triton' needs the model on CUDA (model.cuda() before optimize); on CPU use "
                             "kernels='reference' (or 'auto'), or set TRITON_INTERPRET=1 before importing triton "
                             "to run the kernels in Triton's slow CPU interpreter")
    if backend != "auto":
        return backend
    from tokenopt.kernels.fused import triton_available

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
            import tokenopt.kernels.fused  # noqa: F401  (registers torch.ops.tokenopt.triton_*)

            self.ops = torch.ops.tokenopt
            for node in list(gm.graph.nodes):
                if node._erased or node.op != "call_function":
                    continue  # erased by an earlier match
                for name, rule in self._RULES:
                    if node.target is getattr(tk, rule[0]).default and getattr(self, name)(gm, node):
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

    def _topk(self, gm, gather):
        x, idx, dim = gather.args
        if dim != 1 or not _is(idx, tk.topk_select.default):
            return False
        cls, keep, p = idx.args
        if not _is(cls, tk.cls_attention.default):
            return False
        q, k, scale, bias = (list(cls.args) + [None])[:4]
        anchor, fuse, dead = gather, False, [gather, idx, cls]
        evits = [u for u in idx.users if _is(u, tk.evit_fuse.default)]
        if evits:  # EViT's fused token appended: cat([gather, evit_fuse(...)], 1)
            evit = evits[0]
            cats = [u for u in gather.users if _is(u, aten.cat.default)]
            if len(evits) != 1 or len(cats) != 1 or list(cats[0].args[0]) != [gather, evit] or evit.args[0] is not x:
                return False
            anchor, fuse, dead = cats[0], True, [cats[0], gather, evit, idx, cls]
            if not (_only_users(gather, {anchor}) and _only_users(evit, {anchor})):
                return False
        elif len(idx.users) != 1:
            return False
        if not _only_users(cls, set(dead)) or not _only_users(idx, set(dead)):
            return False
        self._replace(gm, anchor, self.ops.triton_topk_gather.default, (x, q, k, scale, keep, p, fuse, bias),
                      dead=tuple(dead[1:]))
        return True

    def _tome(self, gm, merge):
        x, size, slot, num_slots = merge.args
        if not _is(slot, tk.tome_slots.default) or len(slot.users) != 1:
            return False
        metric, r, p = slot.args[:3]
        active = slot.args[3] if len(slot.args) > 3 else None
        if active is not None or num_slots != _token_count(x) - r:
            return False
        if not (_is(metric, aten.mean.dim) and list(metric.args[1]) == [1]) or len(metric.users) != 1:
            return False
        self._replace(gm, merge, self.ops.triton_tome_merge.default, (x, metric.args[0], size, r, p),
                      dead=(slot, metric))
        return True

    def _varlen(self, gm, node):
        q, k, v, cu_q, cu_k, _cap_q, _cap_k, scale = node.args[:8]
        key_bias = node.args[8] if len(node.args) > 8 else None
        if key_bias is not None:
            return False
        self._replace(gm, node, self.ops.triton_varlen_attention.default, (q, k, v, cu_q, cu_k, scale))
        return True

    def _gather_rows(self, gm, node):
        self._replace(gm, node, self.ops.triton_gather_packed.default, tuple(node.args))
        return True

    def _gather_tokens(self, gm, node):
        self._replace(gm, node, self.ops.triton_gather_tokens.default, tuple(node.args))
        return True

    _RULES = (
        ("_topk", ("gather_tokens", "triton_topk_gather")),
        ("_tome", ("merge_tokens", "triton_tome_merge")),
        ("_varlen", ("varlen_attention", "triton_varlen_attention")),
        ("_gather_rows", ("gather_rows", "triton_gather_packed")),
        ("_gather_tokens", ("gather_tokens", "triton_gather_tokens")),
    )


def _token_count(x: fx.Node) -> int:
    """Token count (axis 1) of ``x`` as recorded in its meta value."""
    v = x.meta.get("val")
    return int(v.shape[1]) if isinstance(v, torch.Tensor) else -1


def fuse_kernels(gm: fx.GraphModule, backend: str = "auto") -> PassResult:
    """Run :class:`FuseKernels` on ``gm``."""
    return FuseKernels(backend)(gm)
