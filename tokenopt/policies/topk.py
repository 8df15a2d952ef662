"""Top-k token pruning by CLS attention, as in EViT (Liang et al., ICLR 2022). Fixed budget."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from tokenopt.ir import Keep
from tokenopt.policies._checks import check_blocks
from tokenopt.policies.base import PolicyConfig, register_policy, require_cls

__all__ = ["TopK"]


@register_policy
@dataclasses.dataclass(frozen=True)
class TopK(PolicyConfig):
    """Keep the ``ceil(keep_rate * patches)`` patch tokens with the most head-averaged CLS attention.

    Args:
        keep_rate: share of the current patch tokens kept at each chosen block, in (0, 1]. Default
            0.7, EViT's main DeiT-S setting.
        blocks: where to prune; default EViT's blocks 4, 7, 10 (every third block from the 4th).
        fuse: merge the dropped tokens into one extra token weighted by CLS attention (EViT).

    Example:
        >>> import tokenopt
        >>> tokenopt.TopK(keep_rate=1.5)
        Traceback (most recent call last):
        ...
        ValueError: topk: keep_rate must be a float in (0, 1], the share of patch tokens kept; got 1.5. Example: keep_rate=0.7
    """

    keep_rate: float = 0.7
    blocks: Optional[tuple[int, ...]] = None
    fuse: bool = False
    name = "topk"

    def __post_init__(self):
        if isinstance(self.keep_rate, bool) or not isinstance(self.keep_rate, (int, float)) or not 0 < self.keep_rate <= 1:
            raise ValueError(f"topk: keep_rate must be a float in (0, 1], the share of patch tokens kept; "
                             f"got {self.keep_rate!r}. Example: keep_rate=0.7")
        if not isinstance(self.fuse, bool):
            raise ValueError(f"topk: fuse must be True or False; got {self.fuse!r}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def default_blocks(self, depth):
        return range(3, depth, 3)  # EViT prunes at blocks 4, 7, 10 of DeiT

    def decide(self, ctx):
        """Keep the ``keep`` patch tokens the CLS token attends to most (+ EViT's fused token)."""
        require_cls(ctx, "top-k")
        ctx.require_dense("a fixed token count")
        p = ctx.num_prefix
        patches = ctx.tokens - p
        keep = min(patches, math.ceil(self.keep_rate * patches))
        if keep == patches:
            return None
        tk = torch.ops.tokenopt
        cls = ctx.cls_attention()
        idx = ctx.call(tk.topk_select.default, cls, keep, p, role="tokens.idx")
        if not self.fuse:
            return Keep(idx, p + keep)
        fused = ctx.call(tk.evit_fuse.default, ctx.x, cls, idx, p, role="tokens.extra")
        return Keep(idx, p + keep, extra=fused, extra_count=1)
