"""Eager references: each model family run block by block in plain PyTorch, with a token-reduction
algorithm applied through :mod:`tokenopt.kernels.reference`.

These never look at graphs. A rewritten GraphModule must match them: that checks the placement and
wiring of every inserted node, the retargeted reshapes and the head. The module attributes used here
are the families' own (this is test code that knows the models; the library does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tokenopt.kernels import reference as ref


@dataclass
class Block:
    norm1: Callable
    qkv: Callable  # h -> (q, k, v) each [B, H, N, D]
    scale: float
    proj: Callable  # [B, N, C] -> [B, N, C]
    ls1: Callable
    norm2: Callable
    mlp: Callable
    ls2: Callable
    # (q, k, v, key bias, scale) -> [B, H, N, D]: attention other than SDPA (talking heads); None: SDPA
    attend: Optional[Callable] = None


def _timm_blocks(model) -> list[Block]:
    out = []
    for blk in model.blocks:
        att = blk.attn

        def qkv(h, att=att):
            b, n, c = h.shape
            q, k, v = att.qkv(h).reshape(b, n, 3, att.num_heads, c // att.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
            return att.q_norm(q), att.k_norm(k), v

        out.append(Block(blk.norm1, qkv, att.scale, lambda o, att=att: att.proj(att.norm(o)), blk.ls1, blk.norm2, blk.mlp, blk.ls2))
    return out


def _hf_blocks(model) -> list[Block]:
    heads = model.config.num_attention_heads
    out = []
    for layer in model.vit.layers:
        att = layer.attention

        def qkv(h, att=att):
            b, n, c = h.shape
            return tuple(f(h).view(b, n, heads, c // heads).transpose(1, 2) for f in (att.q_proj, att.k_proj, att.v_proj))

        ident = lambda t: t  # noqa: E731
        out.append(Block(layer.layernorm_before, qkv, att.scaling, att.o_proj, ident, layer.layernorm_after, layer.mlp, ident))
    return out


@dataclass
class Policy:
    """What to do in which block; mirrors the policy configs (kept separate on purpose)."""

    kind: str = "none"  # "ats" | "topk" | "tome" | "none"
    blocks: tuple = ()
    max_tokens: int = 98
    min_tokens: int = 8
    keep_rate: float = 0.7
    fuse: bool = False
    r: int = 13
    prop_attn: bool = True


def _rows(x, home):
    """x's row for each original token (home < 0: none; those rows read row 0 and are replaced)."""
    return torch.stack([x[b, home[b].clamp(min=0)] for b in range(x.shape[0])])


def _grid_update(grid, x, home):
    rows = _rows(x, home)
    return rows if grid is None else torch.where((home >= 0)[..., None], rows, grid)


def _after_keep(home, idx, valid):
    """Each original token's row after keeping rows ``idx`` (only the ``valid`` ones)."""
    new = torch.full_like(home, -1)
    for b in range(home.shape[0]):
        for j, row in enumerate(idx[b].tolist()):
            if valid is None or bool(valid[b, j]):
                new[b][home[b] == row] = j
    return torch.where(home >= 0, new, -1)


def run_blocks(blocks: list[Block], x: torch.Tensor, num_prefix: int, pol, grid_out: Optional[list] = None):
    """Run the blocks with the policy, or a list of policies applied in order (a composite); returns
    (tokens, valid, size, per-block kept counts [B]). With ``grid_out`` (a list), the full token grid
    after the last block is appended to it: each original token's final row (for a merged token, the row
    it merged into), or for a dropped token its value when it was dropped."""
    pols = list(pol) if isinstance(pol, (list, tuple)) else [pol]
    home = torch.arange(x.shape[1]).expand(x.shape[0], -1).clone() if grid_out is not None else None
    grid = None
    bias = valid = size = None
    prop = False
    counts = {}
    for i, blk in enumerate(blocks):
        q, k, v = blk.qkv(blk.norm1(x))
        ats = [p for p in pols if p.kind == "ats" and i in p.blocks]
        if ats:
            pol = ats[0]
            cls = ref.cls_attention(q, k, blk.scale, bias)
            scores = ref.ats_scores(cls, v, num_prefix, valid)
            idx, valid = ref.ats_select(scores, pol.max_tokens, pol.min_tokens, num_prefix, valid)
            if home is not None:
                grid = _grid_update(grid, x, home)
                home = _after_keep(home, idx, valid)
            o = F.scaled_dot_product_attention(ref.gather_tokens(q, idx, 2), k, v, attn_mask=bias, scale=blk.scale)
            x = ref.gather_tokens(x, idx, 1) + blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
            if size is not None:
                size = ref.gather_tokens(size, idx, 1)
            bias = ref.valid_to_bias(valid, x.dtype)
            if size is not None and prop:
                bias = bias + ref.size_to_bias(size)
        else:
            if blk.attend is not None:
                o = blk.attend(q, k, v, bias, blk.scale)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=blk.scale)
            x = x + blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
        for pol in pols:
            if i not in pol.blocks:
                continue
            if pol.kind == "topk":
                cls = ref.cls_attention(q, k, blk.scale, bias)
                patches = x.shape[1] - num_prefix
                keep = min(patches, math.ceil(pol.keep_rate * patches))
                if keep == patches:
                    continue
                idx = ref.topk_select(cls, keep, num_prefix)
                if home is not None:
                    grid = _grid_update(grid, x, home)
                    home = _after_keep(home, idx, None)
                kept = ref.gather_tokens(x, idx, 1)
                if size is not None:
                    size = ref.gather_tokens(size, idx, 1)
                if pol.fuse:
                    kept = torch.cat([kept, ref.evit_fuse(x, cls, idx, num_prefix)], dim=1)
                    if size is not None:
                        size = torch.cat([size, torch.ones_like(size[:, :1])], dim=1)
                x = kept
                bias = ref.size_to_bias(size) if size is not None and prop else None
            if pol.kind == "tome" and pol.r > 0:
                unm, src, dst = ref.tome_match(k.mean(1), pol.r, num_prefix)
                if home is not None:  # which new row each row went to: merge one-hot row labels alike
                    n = x.shape[1]
                    labels, _ = ref.tome_merge(torch.eye(n).expand(x.shape[0], n, n), size, unm, src, dst, num_prefix)
                    home = torch.where(home >= 0, labels.argmax(1).gather(1, home.clamp(min=0)), -1)
                x, size = ref.tome_merge(x, size, unm, src, dst, num_prefix)
                prop = prop or pol.prop_attn
                bias = ref.size_to_bias(size) if prop else bias
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        counts[i] = valid.sum(1) if valid is not None else torch.full((x.shape[0],), x.shape[1])
    if grid_out is not None:
        grid_out.append(_grid_update(grid, x, home))
    return x, valid, size, counts


def timm_forward(model, img: torch.Tensor, pol: Policy):
    """timm VisionTransformer / VisionTransformerDistilled with ``pol`` applied."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    x, valid, size, counts = run_blocks(_timm_blocks(model), x, model.num_prefix_tokens, pol)
    x = model.norm(x)
    if getattr(model, "global_pool", "token") == "avg":
        p = model.num_prefix_tokens
        pooled = ref.sized_mean(x, size, p) if size is not None else (
            ref.masked_mean(x, valid, p) if valid is not None else x[:, p:].mean(1))
        return model.head(model.head_drop(model.fc_norm(pooled))), counts
    return model.forward_head(x), counts


def hf_forward(model, img: torch.Tensor, pol: Policy):
    """Hugging Face ViTForImageClassification with ``pol`` applied (returns logits)."""
    x = model.vit.embeddings(img)
    x, _valid, _size, counts = run_blocks(_hf_blocks(model), x, 1, pol)
    return model.classifier(model.vit.layernorm(x)[:, 0]), counts
