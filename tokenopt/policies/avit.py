"""A-ViT adaptive halting (Yin et al., CVPR 2022): tokens stop computing once their halting score adds up.

Facts from the authors' code (NVlabs/A-ViT), as summarised in ``shared/METHODS.md``: no new parameters;
after each block the halting score of a token is ``sigmoid(gamma * y[..., 0] - beta)`` on the block
output's first channel; the scores accumulate; a token halts when the sum passes ``1 - eps`` and adds
its remainder times its state to its output, a running token adds ``score`` times its state; at the
last block every token halts; the head reads the final norm of the accumulated outputs. Training adds
a ponder loss (``ponder_weight * mean(rho)``) and a KL term pulling the per-block mean halting score
towards a Gaussian prior over blocks (:func:`avit_losses`).

tokenopt realises the decision (:class:`~tokenopt.ir.Halt`) masked for training (halted tokens masked
out of attention with A-ViT's -1000 key logit: nothing saved, all differentiable) and packed for
inference, where a halted token leaves the buffer so later blocks run on fewer tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from tokenopt.ir import Halt
from tokenopt.policies._checks import check_blocks
from tokenopt.passes.realize import RewriteError
from tokenopt.policies.base import PolicyConfig, register_policy

__all__ = ["AViT", "avit_losses", "halting_prior"]

aten = torch.ops.aten


@register_policy
@dataclasses.dataclass(frozen=True)
class AViT(PolicyConfig):
    """Adaptive token halting.

    Args:
        gamma, beta: the halting score is ``sigmoid(gamma * y0 - beta)``; A-ViT's README uses 10 and 30
            for DeiT-Tiny (75 for Small), its code defaults are 100 and 3.
        eps: a token halts once its cumulative score exceeds ``1 - eps`` (0.01).
        ponder_weight: weight of the ponder loss (README 5e-4).
        prior_mean, prior_sigma, prior_weight: the distributional prior over the block where tokens halt,
            a Gaussian over block index (mean: two thirds of the depth when None; sigma 1) and its KL
            weight (README 0.001; 0 turns it off).
        blocks: the halting blocks; default every block (it must include the last one).

    Example:
        >>> import tokenopt
        >>> tokenopt.AViT(gamma=10.0, beta=30.0)
        AViT(gamma=10.0, beta=30.0, eps=0.01, ponder_weight=0.0005, prior_mean=None, prior_sigma=1.0, prior_weight=0.001, blocks=None)
    """

    gamma: float = 10.0
    beta: float = 30.0
    eps: float = 0.01
    ponder_weight: float = 5e-4
    prior_mean: Optional[float] = None
    prior_sigma: float = 1.0
    prior_weight: float = 1e-3
    blocks: Optional[tuple[int, ...]] = None
    name = "avit"
    site = "post_block"
    adaptive = True

    def __post_init__(self):
        for field in ("gamma", "beta", "eps", "ponder_weight", "prior_sigma", "prior_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"avit: {field} must be a finite number; got {value!r}")
            object.__setattr__(self, field, float(value))
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"avit: eps must be in (0, 1); got {self.eps!r}. Example: eps=0.01")
        if self.prior_sigma <= 0 or self.ponder_weight < 0 or self.prior_weight < 0:
            raise ValueError("avit: prior_sigma must be > 0, ponder_weight and prior_weight >= 0")
        if self.prior_mean is not None and (isinstance(self.prior_mean, bool) or not isinstance(self.prior_mean, (int, float))):
            raise ValueError(f"avit: prior_mean must be a number or None; got {self.prior_mean!r}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def default_mode(self) -> Optional[str]:
        return "packed"

    def decide(self, ctx):
        last = max(self.blocks) if self.blocks else ctx.depth - 1
        if last != ctx.depth - 1:
            raise RewriteError(f"avit: the halting blocks must include the last block ({ctx.depth - 1}), where every "
                             f"token halts; got blocks={self.blocks}")
        y = ctx.x
        first = ctx.call(aten.select.int, y, -1, 0)
        h = ctx.call(aten.sigmoid.default, ctx.call(aten.sub.Tensor, ctx.call(aten.mul.Tensor, first, self.gamma),
                                                    self.beta), role="halt.score")
        return Halt(h, eps=self.eps, last=ctx.block.index == last)

    def training_losses(self, aux: dict) -> dict:
        return avit_losses(self, list(aux["scores"]), aux["rho"])


def halting_prior(depth: int, mean: Optional[float] = None, sigma: float = 1.0) -> torch.Tensor:
    """The distributional prior: a Gaussian over block index ``0..depth-1``, normalised to sum 1."""
    mean = 2 * depth / 3 if mean is None else mean
    blocks = torch.arange(depth, dtype=torch.float64)
    p = torch.exp(-0.5 * ((blocks - mean) / sigma) ** 2)
    return (p / p.sum()).float()


def avit_losses(config: AViT, scores: list[torch.Tensor], rho: torch.Tensor) -> dict[str, torch.Tensor]:
    """A-ViT's auxiliary losses from one forward: ``scores`` the halting scores of each halting block
    (raw, every token), ``rho`` the ponder count of every token.

    - ``ponder``: ``ponder_weight * mean(rho)``;
    - ``prior``: ``prior_weight * KL(prior || q)`` with ``q`` the per-block mean score normalised over
      blocks and clamped to [0.01, 0.99] (``F.kl_div(q.log(), prior, reduction="batchmean")``).
    """
    q = torch.stack([s.float().mean() for s in scores])
    q = (q / q.sum()).clamp(0.01, 0.99)
    prior = halting_prior(len(scores), config.prior_mean, config.prior_sigma).to(q.device)
    return {"ponder": config.ponder_weight * rho.float().mean(),
            "prior": config.prior_weight * F.kl_div(q.log(), prior, reduction="batchmean")}
