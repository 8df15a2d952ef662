"""PiToMe (Tran et al., NeurIPS 2024): token merging guided by an energy score. Training-free, fixed budget.

Facts from the authors' code (hchautran/PiToMe, ``algo/pitome/merge.py``), as summarised in
``shared/METHODS.md``: between attention and MLP, on the keys averaged over heads (as ToMe), every patch
token gets an *energy*, the mean over all tokens of ``elu(cos - margin)``: high for a token inside a
cluster of similar ones, low for an isolated one. Tokens are ordered by energy; the ``2 r`` most
energetic are split alternately into sets A and B and each A token merges into its most similar B token;
every other token is protected. ToMe instead matches every other token against the rest, so an
isolated, informative token can be merged away when the budget is high. Sizes and proportional
attention as ToMe.

tokenopt's form: a :class:`~tokenopt.ir.Merge` from ``tokenopt::pitome_slots``. The margin falls with
depth, ``margin = m0 * (1 - block / depth)`` (deeper tokens are more alike).

Defaults chosen by measurement (2026-11-30, real DINOv2 ViT-S/14, 24 Fashion-MNIST train images, mean
output cosine to the model at equal FLOPs): at r = 20 in every block (FLOPs 0.513) ToMe 0.9961, the
paper's rule with m0 = 0.9 0.9645 and with m0 = 0.5 0.9739, the "bsm" variant with m0 = 0.9 0.9964; at
r = 24 (FLOPs 0.435) ToMe 0.9771, bsm m0 = 0.9 0.9810, bsm m0 = 0.5 0.9845; with ToMe's best decreasing
schedule at FLOPs 0.371, ToMe 0.9790, bsm m0 = 0.9 0.9835. So: bsm, m0 = 0.5.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from tokenopt.ir import Merge
from tokenopt.policies.base import PolicyConfig, register_policy
from tokenopt.policies.tome import ToMe

__all__ = ["PiToMe"]


@register_policy
@dataclasses.dataclass(frozen=True)
class PiToMe(PolicyConfig):
    """Merge ``r`` tokens per block, chosen among the most clustered ones (energy), size-weighted.

    Args:
        r: tokens merged in each chosen block (at most half the patch tokens there), or one value per block.
        blocks: where to merge; default every block.
        margin: the energy margin of block 0; block ``b`` uses ``margin * (1 - b / depth)``.
        alpha: the ELU's slope below the margin.
        best_edges: the authors' "bsm" variant (the default: it measured best on DINOv2, see the module
            docstring): all tokens split A/B by energy rank, the ``r`` best-matched A tokens merge;
            ``False``: the paper's rule, the ``2 r`` most energetic tokens merge, A into B.
        proportional_attention: add ``log(size)`` to attention logits (as ToMe).

    Example:
        >>> import tokenopt
        >>> tokenopt.PiToMe(r=(20, 10)).r
        (20, 10)
    """

    r: Union[int, tuple[int, ...]] = 13
    blocks: Optional[tuple[int, ...]] = None
    margin: float = 0.5
    alpha: float = 1.0
    best_edges: bool = True
    proportional_attention: bool = True
    name = "pitome"

    def __post_init__(self):
        ToMe.__post_init__(self)  # (the same checks of r, blocks and proportional_attention, in ToMe's words)
        for field in ("margin", "alpha"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= (1 if field == "margin" else 10):
                raise ValueError(f"pitome: {field} must be a number in {'[-1, 1]' if field == 'margin' else '[-1, 10]'}; "
                                 f"got {value!r}")

    def decide(self, ctx):
        """Energy of every patch token on the head-averaged keys; the ``2 r`` highest merge A into B."""
        b = ctx.block.index
        r = ToMe.block_r(self, b)
        ctx.require_dense("energy-guided matching")
        p, active = ctx.num_prefix, ctx.tokens
        r = min(r, (active - p) // 2)
        if r <= 0:
            return None
        part = None if active == ctx.length else active
        margin = float(self.margin) * (1 - b / ctx.depth)
        sel = ctx.call(torch.ops.tokenopt.pitome_slots.default, ctx.key_metric(), r, p, margin, float(self.alpha), part,
                       bool(self.best_edges), role="tokens.slot")
        slot, rep = ctx.call.items(sel, 2, roles=("tokens.slot", None))
        return Merge(slot, active - r, proportional=self.proportional_attention, rep=rep if ctx.needs_positions else None)
