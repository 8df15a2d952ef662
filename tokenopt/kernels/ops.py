"""The token ops every rewritten graph calls, as ``torch.library`` custom ops ``tokenopt::*``.

Each op is one plain-PyTorch reference of :mod:`tokenopt.kernels.reference` (the specification; it
runs on CPU and CUDA) behind a custom-op boundary, with

* a fake implementation, so ``torch.export``, ``torch.compile(fullgraph=True)`` and fake-tensor
  propagation see shapes through it (the one data-dependent size, the packed token count of
  ``pack_index``, is an unbacked symbol);
* autograd for the ops a training graph differentiates through (``DIFFERENTIABLE``): the backward
  recomputes the reference under autograd, so gradients are the reference's by construction;
* a decomposition into ATen ops in a table tokenopt owns (:func:`decompositions`), passed explicitly where it
  is used: ONNX export runs ``ExportedProgram.run_decompositions(decompositions())``. Importing tokenopt
  writes nothing into torch's global tables, so ``torch.compile`` of a rewritten graph calls each op
  (its fake gives inductor the shapes) under any environment, ``CI`` set or not.

On a GPU the fusion pass (:mod:`tokenopt.passes.fuse_kernels`) swaps chains of these ops for the Triton
ops of :mod:`tokenopt.kernels.fused`. A graph holds one node per op, so a forward dispatches one op
per token step (not the dozen ATen calls of its reference) and its host syncs are only those an op
documents: ``pack_index``, ``halt_pack``, ``gate_rows`` and ``head_attention`` read one count back; no other
op reads anything back.

Example:
    >>> import torch, tokenopt.kernels.ops  # registers torch.ops.tokenopt.*
    >>> x = torch.arange(12.0).view(1, 4, 3)
    >>> torch.ops.tokenopt.gather_tokens(x, torch.tensor([[3, 0]]), 1)
    tensor([[[ 9., 10., 11.],
             [ 0.,  1.,  2.]]])
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.library import custom_op, get_ctx

from tokenopt.kernels import reference as ref

__all__ = ["REFERENCES", "DIFFERENTIABLE", "SYNCS", "decompositions"]

#: op name -> the reference function it runs
REFERENCES: dict[str, Callable] = {}
#: ops with autograd (the tensor arguments gradients flow to)
DIFFERENTIABLE: dict[str, tuple[int, ...]] = {}
#: host reads per call, by design (every op not listed reads nothing back)
SYNCS = {"pack_index": 1, "halt_pack": 1, "gate_rows": 1, "head_attention": 1}
#: ops on packed tokens (sizes that depend on values) and ATS's selection (which may read them): left out of
#: :func:`decompositions` by default, so a decomposed graph keeps their fakes (unbacked sizes)
PACKED = {"halt_pack", "pack_index", "gather_rows", "unpack", "packed_cls_attention", "varlen_attention", "packed_select",
          "packed_mean", "ats_select", "gate_rows", "take_rows", "add_rows", "head_attention"}


def _fresh(out, inputs):
    """Custom-op outputs are fresh, contiguous tensors (what the fake implementations promise): an
    output that is an input, a view of one, or strided otherwise is copied."""
    storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}

    def fix(t):
        if not isinstance(t, Tensor):
            return t
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            return t.clone(memory_format=torch.contiguous_format)
        return t.contiguous()

    return tuple(fix(t) for t in out) if isinstance(out, tuple) else fix(out)


def _resized(x: Tensor, dim: int, size) -> Tensor:
    """A fake output like ``x`` with ``size`` along ``dim``."""
    shape = list(x.shape)
    shape[dim] = size
    return x.new_empty(shape)


def _op(name: str, reference: Callable, grads: tuple[int, ...] = ()):
    """Register ``fn`` (whose body calls ``reference``) as ``tokenopt::name``; ``grads``: the positions of
    the tensor arguments it is differentiable in."""

    def deco(fn):
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            return _fresh(fn(*args, **kwargs), args + tuple(kwargs.values()))

        op = custom_op(f"tokenopt::{name}", mutates_args=())(impl)
        REFERENCES[name] = reference
        if grads:
            DIFFERENTIABLE[name] = grads
            _autograd_from_reference(op, reference, grads)
        return op

    return deco


def _autograd_from_reference(op, reference: Callable, grads: tuple[int, ...]) -> None:
    def setup_context(ctx, inputs, output):
        ctx.inputs = inputs
        ctx.save_for_backward(*[inputs[i] for i in grads])

    def backward(ctx, *grad_out):
        saved = ctx.saved_tensors
        args = list(ctx.inputs)
        wrt = []
        with torch.enable_grad():
            for i, t in zip(grads, saved):
                if isinstance(t, Tensor) and t.is_floating_point():
                    args[i] = t.detach().requires_grad_(True)
                    wrt.append(i)
            out = reference(*args)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grad_out)
                     if g is not None and isinstance(o, Tensor) and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wrt], [g for _, g in pairs],
                                      allow_unused=True) if pairs and wrt else [None] * len(wrt)
        result = [None] * len(args)
        for i, g in zip(wrt, got):
            result[i] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def decompositions(*, include_packed: bool = False, export: bool = True) -> dict:
    """``{op overload: ATen decomposition}`` for the tokenopt ops: a table tokenopt owns and passes where it is
    used (``ExportedProgram.run_decompositions(table)`` before ONNX export, inductor's ``decompositions=``);
    nothing is written into torch's global ``torch._decomp.decomposition_table``.

    Args:
        include_packed: also the ops on packed tokens and ATS's selection (sizes that depend on values);
            left out by default: a graph with them keeps their fakes (unbacked sizes) and does not export.
        export: take the export form where it differs from the reference (``tome_slots`` and ``pitome_slots`` rank
            with TopK, which ONNX has, in place of a sort).
    """
    export_forms = {
        "tome_slots": lambda metric, r, num_prefix, active=None: ref.tome_slots(metric, r, num_prefix, active, True),
        "pitome_slots": lambda metric, r, num_prefix, margin, alpha, active, best_edges=False: ref.pitome_slots(
            metric, r, num_prefix, margin, alpha, active, best_edges, by_topk=True),
    } if export else {}
    return {getattr(torch.ops.tokenopt, name).default: export_forms.get(name, fn)
            for name, fn in REFERENCES.items() if include_packed or name not in PACKED}


# --- scoring -----------------------------------------------------------------------------------------


@_op("cls_attention", ref.cls_attention, grads=(0, 1))
def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor] = None) -> Tensor:
    """CLS-row softmax attention ``[B, H, N]`` = ``reference.cls_attention``."""
    return ref.cls_attention(q, k, scale, bias)


@cls_attention.register_fake
def _(q, k, scale, bias=None):
    return q.new_empty(q.shape[0], q.shape[1], k.shape[2])


@_op("value_norms", ref.value_norms, grads=(0,))
def value_norms(v: Tensor) -> Tensor:
    """``[B, H, N, D]`` -> ``[B, N]`` value norms over heads = ``reference.value_norms``."""
    return ref.value_norms(v)


@value_norms.register_fake
def _(v):
    return v.new_empty(v.shape[0], v.shape[2], dtype=torch.promote_types(v.dtype, torch.float32))


def _ats_ref(cls_attn, vnorm, num_prefix, num_samples, min_tokens, valid, width):
    scores = ref.ats_scores_from_norms(cls_attn, vnorm, num_prefix, valid)
    return ref.ats_select(scores, num_samples, min_tokens, num_prefix, valid, width)


@_op("ats_select", _ats_ref)
def ats_select(
    cls_attn: Tensor, vnorm: Tensor, num_prefix: int, num_samples: int, min_tokens: int,
    valid: Optional[Tensor], width: int,
) -> tuple[Tensor, Tensor]:
    """ATS scores and inverse-transform sampling -> ``(idx, valid) [B, P + width]`` =
    ``reference.ats_scores_from_norms`` -> ``reference.ats_select(..., width)``."""
    return _ats_ref(cls_attn, vnorm, num_prefix, num_samples, min_tokens, valid, width)


@ats_select.register_fake
def _(cls_attn, vnorm, num_prefix, num_samples, min_tokens, valid, width):
    b, n = vnorm.shape
    m = num_prefix + torch.sym_min(width, n - num_prefix)
    return vnorm.new_empty(b, m, dtype=torch.long), vnorm.new_empty(b, m, dtype=torch.bool)


@_op("topk_select", ref.topk_select)
def topk_select(cls_attn: Tensor, keep: int, num_prefix: int) -> Tensor:
    """EViT top-k indices ``[B, P + keep]`` = ``reference.topk_select``."""
    return ref.topk_select(cls_attn, keep, num_prefix)


@topk_select.register_fake
def _(cls_attn, keep, num_prefix):
    return cls_attn.new_empty(cls_attn.shape[0], num_prefix + keep, dtype=torch.long)


@_op("evit_fuse", ref.evit_fuse, grads=(0, 1))
def evit_fuse(x: Tensor, cls_attn: Tensor, idx: Tensor, num_prefix: int) -> Tensor:
    """EViT's fused token ``[B, 1, C]`` = ``reference.evit_fuse``."""
    return ref.evit_fuse(x, cls_attn, idx, num_prefix)


@evit_fuse.register_fake
def _(x, cls_attn, idx, num_prefix):
    return x.new_empty(x.shape[0], 1, x.shape[2])


@_op("tome_slots", ref.tome_slots)
def tome_slots(metric: Tensor, r: int, num_prefix: int, active: Optional[int] = None) -> Tensor:
    """ToMe bipartite matching as merge slots ``[B, N]`` = ``reference.tome_slots``."""
    return ref.tome_slots(metric, r, num_prefix, active)


@tome_slots.register_fake
def _(metric, r, num_prefix, active=None):
    return metric.new_empty(metric.shape[0], metric.shape[1], dtype=torch.long)


# --- realisation: dense and padded -----------------------------------------------------------------


@_op("gather_tokens", ref.gather_tokens, grads=(0,))
def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Tokens ``idx [B, M]`` along ``dim`` = ``reference.gather_tokens``."""
    return ref.gather_tokens(x, idx, dim)


@gather_tokens.register_fake
def _(x, idx, dim):
    return _resized(x, dim, idx.shape[1])


@_op("pad_indices", ref.pad_indices)
def pad_indices(idx: Tensor, valid: Optional[Tensor], width: int) -> tuple[Tensor, Tensor]:
    """``idx``/``valid`` widened to ``width`` = ``reference.pad_indices``."""
    return ref.pad_indices(idx, valid, width)


@pad_indices.register_fake
def _(idx, valid, width):
    return idx.new_empty(idx.shape[0], width), idx.new_empty(idx.shape[0], width, dtype=torch.bool)


@_op("gather_valid", ref.gather_valid)
def gather_valid(valid_in: Tensor, idx: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Validity of gathered tokens = ``reference.gather_valid``."""
    return ref.gather_valid(valid_in, idx, valid)


@gather_valid.register_fake
def _(valid_in, idx, valid):
    return idx.new_empty(idx.shape, dtype=torch.bool)


@_op("token_bias", ref.token_bias, grads=(1,))
def token_bias(valid: Optional[Tensor], size: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Key bias ``[B, 1, 1, N]`` from validity and merge sizes = ``reference.token_bias``."""
    return ref.token_bias(valid, size, dtype)


@token_bias.register_fake
def _(valid, size, dtype):
    like = valid if valid is not None else size
    return like.new_empty(like.shape[0], 1, 1, like.shape[1], dtype=dtype)


@_op("merge_tokens", ref.merge_tokens, grads=(0, 1))
def merge_tokens(x: Tensor, size: Optional[Tensor], slot: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Size-weighted merge into slots = ``reference.merge_tokens``."""
    return ref.merge_tokens(x, size, slot, num_slots)


@merge_tokens.register_fake
def _(x, size, slot, num_slots):
    return x.new_empty(x.shape[0], num_slots, x.shape[2]), x.new_empty(x.shape[0], num_slots, 1)


@_op("slots_valid", ref.slots_valid)
def slots_valid(slot: Tensor, num_slots: int, valid_in: Optional[Tensor] = None) -> Tensor:
    """Which merge slots hold a token = ``reference.slots_valid``."""
    return ref.slots_valid(slot, num_slots, valid_in)


@slots_valid.register_fake
def _(slot, num_slots, valid_in=None):
    return slot.new_empty(slot.shape[0], num_slots, dtype=torch.bool)


@_op("weighted_mean", ref.weighted_mean, grads=(0, 2))
def weighted_mean(x: Tensor, valid: Optional[Tensor], size: Optional[Tensor], start: int, end: Optional[int]) -> Tensor:
    """Pooling over valid tokens weighted by size = ``reference.weighted_mean``."""
    return ref.weighted_mean(x, valid, size, start, end)


@weighted_mean.register_fake
def _(x, valid, size, start, end):
    return x.new_empty(x.shape[0], x.shape[2])


# --- realisation: packed ---------------------------------------------------------------------------


@_op("pack_index", ref.pack_index)
def pack_index(idx: Tensor, valid: Tensor, cu_in: Optional[Tensor], length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Kept positions -> packed rows ``flat [T]``, offsets ``cu [B + 1]`` and ``longest [L]`` =
    ``reference.pack_index`` (one host read: the one sync of a packed reduction)."""
    return ref.pack_index(idx, valid, cu_in, length)


@pack_index.register_fake
def _(idx, valid, cu_in, length):
    ctx = get_ctx()
    t, longest = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (idx.new_empty(t, dtype=torch.long), idx.new_empty(idx.shape[0] + 1, dtype=torch.long),
            idx.new_empty(longest, dtype=torch.int8))


@_op("gather_rows", ref.gather_packed, grads=(0,))
def gather_rows(x: Tensor, flat: Tensor) -> Tensor:
    """Rows ``flat`` of a dense or packed buffer into a packed one = ``reference.gather_packed``."""
    return ref.gather_packed(x, flat)


@gather_rows.register_fake
def _(x, flat):
    if x.dim() == 3:
        return x.new_empty(1, flat.shape[0], x.shape[2])
    return x.new_empty(1, x.shape[1], flat.shape[0], x.shape[3])


@_op("unpack", ref.unpack, grads=(0,))
def unpack(x: Tensor, cu: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Packed -> padded to ``capacity`` = ``reference.unpack``."""
    return ref.unpack(x, cu, capacity)


@unpack.register_fake
def _(x, cu, capacity):
    b = cu.shape[0] - 1
    shape = (b, capacity, x.shape[2]) if x.dim() == 3 else (b, x.shape[1], capacity, x.shape[3])
    return x.new_empty(shape), x.new_empty(b, capacity, dtype=torch.bool)


@_op("packed_cls_attention", ref.packed_cls_attention, grads=(0, 1, 2))
def packed_cls_attention(
    q: Tensor, k: Tensor, v: Tensor, cu: Tensor, capacity: int, scale: float, size: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """CLS attention and value norms of packed tokens, padded to ``capacity`` = ``reference.packed_cls_attention``."""
    return ref.packed_cls_attention(q, k, v, cu, capacity, scale, size)


@packed_cls_attention.register_fake
def _(q, k, v, cu, capacity, scale, size=None):
    b, h = cu.shape[0] - 1, q.shape[1]
    return (q.new_empty(b, h, capacity, dtype=torch.float32), q.new_empty(b, capacity, dtype=torch.float32),
            q.new_empty(b, capacity, dtype=torch.bool))


@_op("varlen_attention", ref.varlen_attention_padded, grads=(0, 1, 2, 8))
def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Optional[Tensor], cap_q: int, cap_k: int, scale: float,
    key_bias: Optional[Tensor] = None,
) -> Tensor:
    """Packed queries, each image over its own keys = ``reference.varlen_attention_padded`` (on a CPU, computed
    as ``reference.varlen_attention_segments``: the same values, one SDPA per image)."""
    if q.device.type == "cpu" and cu_q.device.type == "cpu":
        return ref.varlen_attention_segments(q, k, v, cu_q, cu_k, scale, key_bias)
    return ref.varlen_attention_padded(q, k, v, cu_q, cu_k, cap_q, cap_k, scale, key_bias)


@varlen_attention.register_fake
def _(q, k, v, cu_q, cu_k, cap_q, cap_k, scale, key_bias=None):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])


@_op("packed_select", ref.packed_select, grads=(0,))
def packed_select(x: Tensor, cu: Tensor, index: int) -> Tensor:
    """Prefix token ``index`` of every image of a packed buffer = ``reference.packed_select``."""
    return ref.packed_select(x, cu, index)


@packed_select.register_fake
def _(x, cu, index):
    return x.new_empty(cu.shape[0] - 1, x.shape[2])


@_op("packed_mean", ref.packed_weighted_mean, grads=(0, 2))
def packed_mean(x: Tensor, cu: Tensor, size: Optional[Tensor], start: int, end: Optional[int]) -> Tensor:
    """Per-image (size-weighted) mean of a packed buffer = ``reference.packed_weighted_mean``."""
    return ref.packed_weighted_mean(x, cu, size, start, end)


@packed_mean.register_fake
def _(x, cu, size, start, end):
    return x.new_empty(cu.shape[0] - 1, x.shape[2])


# --- dense restore ---------------------------------------------------------------------------------


@_op("token_home", ref.token_home)
def token_home(like: Tensor, n: int) -> Tensor:
    """Every token's row = ``reference.token_home``."""
    return ref.token_home(like, n)


@token_home.register_fake
def _(like, n):
    return like.new_empty(like.shape[0], n, dtype=torch.long)


@_op("keep_map", ref.keep_map)
def keep_map(idx: Tensor, valid: Optional[Tensor], length: int) -> Tensor:
    """Each dense row's row after a Keep = ``reference.keep_map``."""
    return ref.keep_map(idx, valid, length)


@keep_map.register_fake
def _(idx, valid, length):
    return idx.new_empty(idx.shape[0] * length)


@_op("slot_map", ref.slot_map)
def slot_map(slot: Tensor, num_slots: int) -> Tensor:
    """Each dense row's row after a merge = ``reference.slot_map``."""
    return ref.slot_map(slot, num_slots)


@slot_map.register_fake
def _(slot, num_slots):
    return slot.new_empty(slot.shape[0] * slot.shape[1])


@_op("follow_rows", ref.follow_rows)
def follow_rows(home: Tensor, row_map: Tensor) -> Tensor:
    """Original tokens' rows after a Keep, merge or packing = ``reference.follow_rows``."""
    return ref.follow_rows(home, row_map)


@follow_rows.register_fake
def _(home, row_map):
    return torch.empty_like(home)


@_op("dense_restore", ref.dense_restore, grads=(0, 2))
def dense_restore(x: Tensor, home: Tensor, dense: Optional[Tensor]) -> Tensor:
    """The full token grid back = ``reference.dense_restore``."""
    return ref.dense_restore(x, home, dense)


@dense_restore.register_fake
def _(x, home, dense):
    return x.new_empty(home.shape[0], home.shape[1], x.shape[-1])


# --- adaptive halting ------------------------------------------------------------------------------


@_op("act_step", ref.act_step, grads=(0, 1, 2, 3, 4, 5))
def act_step(y: Tensor, h: Tensor, cum: Optional[Tensor], rem: Optional[Tensor], rho: Optional[Tensor],
             acc: Optional[Tensor], active: Optional[Tensor], eps: float, last: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One block of adaptive halting = ``reference.act_step``."""
    return ref.act_step(y, h, cum, rem, rho, acc, active, eps, last)


@act_step.register_fake
def _(y, h, cum, rem, rho, acc, active, eps, last):
    return (torch.empty_like(y), torch.empty_like(h), torch.empty_like(h), torch.empty_like(h), torch.empty_like(y),
            torch.empty_like(h, dtype=torch.bool))


@_op("halt_bias", ref.halt_bias)
def halt_bias(active: Tensor, dtype: torch.dtype) -> Tensor:
    """Key bias masking halted tokens = ``reference.halt_bias``."""
    return ref.halt_bias(active, dtype)


@halt_bias.register_fake
def _(active, dtype):
    return active.new_empty(active.shape[0], 1, 1, active.shape[1], dtype=dtype)


@_op("halt_pack", ref.halt_pack)
def halt_pack(y: Tensor, h: Tensor, cum: Optional[Tensor], rem: Optional[Tensor], rho: Optional[Tensor],
              grid: Optional[Tensor], home: Optional[Tensor], cu: Optional[Tensor], eps: float, last: bool, n0: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adaptive halting on packed tokens (inference) = ``reference.halt_pack`` (one host read unless ``last``)."""
    return ref.halt_pack(y, h, cum, rem, rho, grid, home, cu, eps, last, n0)


@halt_pack.register_fake
def _(y, h, cum, rem, rho, grid, home, cu, eps, last, n0):
    b = y.shape[0] if cu is None else cu.shape[0] - 1
    if last:
        t = longest = 0
    else:
        ctx = get_ctx()
        t, longest = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (y.new_empty(1, t, y.shape[-1]), h.new_empty(1, t), h.new_empty(1, t), h.new_empty(1, t),
            y.new_empty(b, n0, y.shape[-1]), y.new_empty(t, dtype=torch.long), y.new_empty(b + 1, dtype=torch.long),
            y.new_empty(longest, dtype=torch.int8), torch.empty_like(h, dtype=torch.bool))


# --- per-token side tables -------------------------------------------------------------------------


@_op("token_positions", ref.token_positions)
def token_positions(like: Tensor, n: int) -> Tensor:
    """Original positions ``[B, n]`` = ``reference.token_positions``."""
    return ref.token_positions(like, n)


@token_positions.register_fake
def _(like, n):
    return like.new_empty(like.shape[0], n, dtype=torch.long)


@_op("side_gather", ref.side_gather, grads=(0,))
def side_gather(table: Tensor, pos: Tensor, axis: int, offset: int, rank: int) -> Tensor:
    """A per-token table gathered for every image's current tokens = ``reference.side_gather``."""
    return ref.side_gather(table, pos, axis, offset, rank)


@side_gather.register_fake
def _(table, pos, axis, offset, rank):
    while table.dim() > rank - 1 and table.shape[0] == 1:
        table = table[0]
    shape = list(table.shape)
    shape[table.dim() + axis] = pos.shape[1] - offset
    return table.new_empty([pos.shape[0]] + [1] * (rank - 1 - len(shape)) + shape)


@_op("pair_gather", ref.pair_gather, grads=(0,))
def pair_gather(table: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
    """A pairwise table for every image's current query/key tokens = ``reference.pair_gather``."""
    return ref.pair_gather(table, pos_q, pos_k)


@pair_gather.register_fake
def _(table, pos_q, pos_k):
    lead = list(table.shape[:-2])
    while lead and lead[0] == 1:
        lead = lead[1:]
    return table.new_empty([pos_q.shape[0]] + lead + [pos_q.shape[1], pos_k.shape[1]])


@_op("slot_positions", ref.slot_positions)
def slot_positions(pos: Tensor, slot: Tensor, rep: Tensor, num_slots: int) -> Tensor:
    """Original positions after a merge = ``reference.slot_positions``."""
    return ref.slot_positions(pos, slot, rep, num_slots)


@slot_positions.register_fake
def _(pos, slot, rep, num_slots):
    return pos.new_empty(pos.shape[0], num_slots)


@_op("tome_representatives", ref.tome_representatives)
def tome_representatives(slot: Tensor, num_prefix: int, active: Optional[int] = None) -> Tensor:
    """Which token stands for its slot after ToMe = ``reference.tome_representatives``."""
    return ref.tome_representatives(slot, num_prefix, active)


@tome_representatives.register_fake
def _(slot, num_prefix, active=None):
    return slot.new_empty(slot.shape, dtype=torch.bool)


# --- learned token decisions -----------------------------------------------------------------------


@_op("gumbel_keep", ref.gumbel_keep, grads=(0,))
def gumbel_keep(logp: Tensor, gumbel: Tensor) -> Tensor:
    """DynamicViT's hard Gumbel-softmax keep mask (straight-through) = ``reference.gumbel_keep``."""
    return ref.gumbel_keep(logp, gumbel)


@gumbel_keep.register_fake
def _(logp, gumbel):
    return logp.new_empty(logp.shape[:-1])


@_op("policy_attention", ref.policy_attention, grads=(0, 1, 2, 3, 5))
def policy_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, bias: Optional[Tensor] = None
                     ) -> Tensor:
    """Attention with a soft key mask (DynamicViT training) = ``reference.policy_attention``."""
    return ref.policy_attention(q, k, v, keep, scale, bias)


@policy_attention.register_fake
def _(q, k, v, keep, scale, bias=None):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@_op("mass_select", ref.mass_select)
def mass_select(cls_attn: Tensor, density: Tensor, num_prefix: int, valid: Optional[Tensor], width: int
                ) -> tuple[Tensor, Tensor]:
    """Per-image tokens carrying a share of the CLS-attention mass (SaiT) = ``reference.mass_select``."""
    return ref.mass_select(cls_attn, density, num_prefix, valid, width)


@mass_select.register_fake
def _(cls_attn, density, num_prefix, valid, width):
    b = cls_attn.shape[0]
    return (cls_attn.new_empty(b, num_prefix + width, dtype=torch.long),
            cls_attn.new_empty(b, num_prefix + width, dtype=torch.bool))


# --- AdaViT gates ------------------------------------------------------------------------------------


@_op("gumbel_gate", ref.gumbel_gate, grads=(0,))
def gumbel_gate(logits: Tensor, noise: Tensor, tau: float, threshold: float) -> Tensor:
    """AdaViT's hard Gumbel-sigmoid gate (straight-through) = ``reference.gumbel_gate``."""
    return ref.gumbel_gate(logits, noise, tau, threshold)


@gumbel_gate.register_fake
def _(logits, noise, tau, threshold):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@_op("keep_select", ref.keep_select)
def keep_select(keep: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Kept patch tokens (bool mask) -> prefix-first ``(idx, valid)`` = ``reference.keep_select``."""
    return ref.keep_select(keep, num_prefix)


@keep_select.register_fake
def _(keep, num_prefix):
    b, n = keep.shape
    return keep.new_empty(b, num_prefix + n, dtype=torch.long), keep.new_empty(b, num_prefix + n, dtype=torch.bool)


@_op("gate_rows", ref.gate_rows)
def gate_rows(run: Tensor, cu: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The images a gate runs and their rows = ``reference.gate_rows`` (one host read)."""
    return ref.gate_rows(run, cu)


@gate_rows.register_fake
def _(run, cu):
    ctx = get_ctx()
    k = ctx.new_dynamic_size()
    rows = k if cu is None else ctx.new_dynamic_size()
    sub = 0 if cu is None else k + 1
    return (run.new_empty(rows, dtype=torch.long), run.new_empty(k, dtype=torch.long),
            run.new_empty(sub, dtype=torch.long))


@_op("take_rows", ref.take_rows)
def take_rows(x: Tensor, dim: int, rows: Tensor) -> Tensor:
    """The rows a gate runs (``gate_rows``'s) = ``reference.take_rows``: an ``index_select``, or a copy of ``x``
    when they are all of it."""
    return ref.take_rows(x, dim, rows)


@take_rows.register_fake
def _(x, dim, rows):
    return _resized(x, dim, rows.shape[0])


@_op("add_rows", ref.add_rows)
def add_rows(x: Tensor, dim: int, rows: Tensor, branch: Tensor) -> Tensor:
    """A gated branch's output added back at its rows = ``reference.add_rows``: an ``index_add``, or ``x + branch``
    when the rows are all of ``x``."""
    return ref.add_rows(x, dim, rows, branch)


@add_rows.register_fake
def _(x, dim, rows, branch):
    return torch.empty_like(x)


@_op("head_attention", ref.head_attention)
def head_attention(q: Tensor, k: Tensor, v: Tensor, heads: Tensor, scale: float, key_bias: Optional[Tensor] = None,
                   cu: Optional[Tensor] = None, capacity: int = 0) -> Tensor:
    """Attention of the gated-on (image, head) pairs only = ``reference.head_attention`` (one host read; on a
    CPU computed as ``reference.head_attention_segments``: the same values, in runs of images over views)."""
    if q.device.type == "cpu" and heads.device.type == "cpu" and (cu is None or cu.device.type == "cpu"):
        return ref.head_attention_segments(q, k, v, heads, scale, cu, key_bias)
    return ref.head_attention(q, k, v, heads, scale, key_bias, cu, capacity)


@head_attention.register_fake
def _(q, k, v, heads, scale, key_bias=None, cu=None, capacity=0):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


# --- PiToMe --------------------------------------------------------------------------------------------


@_op("pitome_slots", ref.pitome_slots)
def pitome_slots(metric: Tensor, r: int, num_prefix: int, margin: float, alpha: float, active: Optional[int],
                 best_edges: bool = False) -> tuple[Tensor, Tensor]:
    """PiToMe's energy-guided merge decision as slots = ``reference.pitome_slots``."""
    return ref.pitome_slots(metric, r, num_prefix, margin, alpha, active, best_edges)


@pitome_slots.register_fake
def _(metric, r, num_prefix, margin, alpha, active, best_edges=False):
    b, n = metric.shape[:2]
    return metric.new_empty(b, n, dtype=torch.long), metric.new_empty(b, n, dtype=torch.bool)
