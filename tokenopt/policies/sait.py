"""SaiT (Li et al. 2022): one set of weights for every token density, with adaptive per-image pruning.

Facts (``shared/METHODS.md``): the weights are trained alternately dense (every token) and sparse
(pruned), so the same model runs at any token density chosen at run time, full density included with no
loss; pruning is adaptive per image: token importance from attention, and each image keeps the tokens
that carry a set share of the importance mass.

tokenopt's form: at the chosen blocks (after attention) the patch tokens are ranked by head-averaged CLS
attention and each image keeps the fewest that carry ``density`` of its mass (``tokenopt::mass_select``).
``density`` is a *knob*: a 0-d buffer of the emitted graph (``gm.density = 0.8``), not a rebuild;
``gm.density = 1.0`` keeps every token, which is the original model. Counts vary per image, so the
inference graph is packed. Training (``tokenopt train --policy sait``) alternates dense steps
(density 1) and sparse steps (``train_density``, or a density drawn from a ``train_density`` range) on
the masked graph.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from tokenopt.ir import Keep
from tokenopt.policies._checks import check_blocks
from tokenopt.policies.base import PolicyConfig, register_policy, require_cls

__all__ = ["SaiT"]


def _share(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"sait: {name} must be a float in (0, 1], a share of the CLS-attention mass; got {value!r}. "
                         f"Example: {name}=0.9")
    return float(value)


@register_policy
@dataclasses.dataclass(frozen=True)
class SaiT(PolicyConfig):
    """Adaptive pruning by attention mass, with the density a run-time knob.

    Args:
        density: the share of each image's CLS-attention mass its kept patch tokens carry, in (0, 1];
            the graph's starting value (change it on the graph: ``gm.density = 0.7``; 1.0 = dense).
        train_density: the density of the sparse training steps (``tokenopt train``; dense steps use 1), or
            a range ``(low, high)``: each sparse step draws its density uniformly from it, so the weights
            learn every density the graph may run at (tokenopt's addition; one fixed density trains the
            model for that token count and no other).
        blocks: where to prune (after attention); default one block, a quarter of the way in
            (tokenopt's choice: early enough to save most of the work).
    """

    density: float = 0.9
    train_density: Union[float, tuple[float, float]] = 0.8
    blocks: Optional[tuple[int, ...]] = None
    name = "sait"
    adaptive = True

    def __post_init__(self):
        object.__setattr__(self, "density", _share("density", self.density))
        td = self.train_density
        if isinstance(td, (tuple, list)):
            if len(td) != 2:
                raise ValueError(f"sait: train_density must be a share or a range (low, high) of two; got {td!r}. "
                                 "Example: train_density=(0.7, 0.99)")
            td = tuple(_share("train_density", v) for v in td)
            if td[0] > td[1]:
                raise ValueError(f"sait: train_density range {td!r} has low > high. Example: train_density=(0.7, 0.99)")
        else:
            td = _share("train_density", td)
        object.__setattr__(self, "train_density", td)
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def default_blocks(self, depth):
        return [max(1, depth // 4)] if depth > 1 else []

    def sparse_density(self, u: float) -> float:
        """The density of a sparse training step, given a uniform draw ``u`` in [0, 1): ``train_density``,
        or for a range ``(low, high)``, ``low + u * (high - low)``."""
        if isinstance(self.train_density, tuple):
            low, high = self.train_density
            return low + u * (high - low)
        return self.train_density

    def default_mode(self):
        return "packed"

    def decide(self, ctx):
        require_cls(ctx, "SaiT")
        p = ctx.num_prefix
        density = ctx.knob("density", self.density)
        width = ctx.length - p
        sel = ctx.call(torch.ops.tokenopt.mass_select.default, ctx.cls_attention(), density, p, ctx.valid, width,
                       role="tokens.select")
        idx, valid = ctx.call.items(sel, 2, roles=("tokens.idx", "tokens.valid"))
        return Keep(idx, p + width, valid=valid)
