"""ToMe: token merging (Bolya et al., ICLR 2023). Training-free, fixed budget."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from tokenopt.ir import Merge
from tokenopt.passes.realize import RewriteError
from tokenopt.policies._checks import check_blocks
from tokenopt.policies.base import PolicyConfig, register_policy

__all__ = ["ToMe"]


@register_policy
@dataclasses.dataclass(frozen=True)
class ToMe(PolicyConfig):
    """Merge ``r`` tokens per block by bipartite soft matching on the keys, size-weighted.

    Args:
        r: tokens merged in each chosen block (capped at half the patch tokens there), or a list with
            one value per model block. Default 13: the ToMe paper's DeiT-S setting (2.7 GFLOPs,
            79.4% top-1 off the shelf, per the paper's results table).
        blocks: where to merge; default every block.
        proportional_attention: add ``log(size)`` to attention logits so merged tokens weigh as the
            patches they stand for.

    Example:
        >>> import tokenopt
        >>> tokenopt.ToMe(r=[8] * 12).r
        (8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8)
        >>> tokenopt.ToMe(r=-1)
        Traceback (most recent call last):
        ...
        ValueError: tome: r must be an int >= 0 or a list of them (one per block); got -1. Example: r=13
    """

    r: Union[int, tuple[int, ...]] = 13
    blocks: Optional[tuple[int, ...]] = None
    proportional_attention: bool = True
    name = "tome"

    def __post_init__(self):
        r = self.r
        ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 0) or (
            isinstance(r, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r)
        )
        if not ok:
            raise ValueError(f"tome: r must be an int >= 0 or a list of them (one per block); got {r!r}. Example: r=13")
        if isinstance(r, list):
            object.__setattr__(self, "r", tuple(r))
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"tome: proportional_attention must be True or False; got "
                             f"{self.proportional_attention!r}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def block_r(self, block: int) -> int:
        """This block's ``r`` (one int for every block, or the block's entry of the list)."""
        if isinstance(self.r, int):
            return self.r
        if block < len(self.r):
            return self.r[block]
        raise RewriteError(f"{self.name}: r lists {len(self.r)} values but the model has more blocks (block {block}); "
                           "give one value per block or a single int")

    def decide(self, ctx):
        """Bipartite soft matching on the head-averaged keys: the ``r`` best-matched pairs merge."""
        r = self.block_r(ctx.block.index)
        ctx.require_dense("bipartite matching")
        p, active = ctx.num_prefix, ctx.tokens
        # bipartite matching: sources are every other patch token, destinations the rest (at least one)
        r = min(r, (active - p + 1) // 2) if active - p >= 2 else 0
        if r <= 0:
            return None
        part = None if active == ctx.length else active
        slot = ctx.call(torch.ops.tokenopt.tome_slots.default, ctx.key_metric(), r, p, part, role="tokens.slot")
        # the merge destinations keep their positions (read only by models with rotary / relative tables)
        rep = ctx.call(torch.ops.tokenopt.tome_representatives.default, slot, p, part) if ctx.needs_positions else None
        return Merge(slot, active - r, proportional=self.proportional_attention, rep=rep)
