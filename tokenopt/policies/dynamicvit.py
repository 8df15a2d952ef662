"""DynamicViT (Rao et al., NeurIPS 2021): a learned predictor drops tokens before chosen blocks.

Facts from the authors' code (raoyongming/DynamicViT), as summarised in ``shared/METHODS.md``: before
each pruning stage a small MLP (the *predictor*) reads every current patch token: a LayerNorm and a
linear layer with GELU, whose output is split in half, a local half (the token's own) and a global half
(the mean over the kept tokens); the two halves concatenated go through three linear layers (to C/2,
C/4 and 2) with GELU between and a log-softmax: "keep" and "drop" log-probabilities. In training a
hard Gumbel-softmax sample of them, times the previous stage's decision, masks the dropped tokens out of
every later attention (each token keeps its own diagonal; ``softmax_with_policy``) and a keep-ratio loss
(MSE of each stage's kept share against ``rho ** stage``) pulls the counts to the target; distillation
to the unpruned model (``tokenopt train --distill``) keeps the accuracy. At inference each stage keeps
the ``int(patches * rho ** stage)`` patch tokens the predictor ranks highest: the same count for every
image, so batches stay dense (tokenopt's padded form).

tokenopt realises the training decision as a :class:`~tokenopt.ir.Mask` (masked form only) and the
inference decision as a :class:`~tokenopt.ir.Keep`; the predictors are the policy's own parameters
(``gm.tokenopt_dynamicvit``), trained with the model and passed back with ``policy_state``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from tokenopt.ir import Keep, Mask
from tokenopt.passes.realize import RewriteError
from tokenopt.policies._checks import check_blocks
from tokenopt.policies.base import PolicyConfig, register_policy

__all__ = ["DynamicViT", "Predictor", "attention_rank_loss", "dynamicvit_losses"]

aten = torch.ops.aten


class Predictor(nn.Module):
    """The token predictor: ``(x [B, N, C], weights [B, N, 1]) -> log-probabilities [B, N, 2]`` (keep, drop).

    ``weights`` marks the tokens still kept (1) for the global mean; the local half of each token's
    features is its own."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 8:
            raise ValueError(f"dynamicvit: the predictor needs a token width of at least 8; this model's is {dim}")
        self.norm = nn.LayerNorm(dim)
        self.embed = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, dim // 2)
        self.fc2 = nn.Linear(dim // 2, dim // 4)
        self.fc3 = nn.Linear(dim // 4, 2)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.embed(self.norm(x)))
        half = h.shape[-1] // 2
        own, shared = h[..., :half], h[..., half:]
        pooled = (shared * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        h = torch.cat([own, pooled.expand_as(shared)], dim=-1)
        h = nn.functional.gelu(self.fc1(h))
        h = nn.functional.gelu(self.fc2(h))
        return self.fc3(h).log_softmax(dim=-1)


@register_policy
@dataclasses.dataclass(frozen=True)
class DynamicViT(PolicyConfig):
    """Learned token pruning with a fixed keep ratio per stage.

    Args:
        rho: the share of patch tokens kept at each stage, compounding: stage ``s`` (1, 2, ...) keeps
            ``int(patches * rho ** s)`` of the model's patches (DynamicViT: 0.7).
        blocks: prune after these blocks (0-based), so the next block runs on fewer tokens; default
            after blocks ``round(depth * s / 4) - 1`` for s = 1, 2, 3 (DeiT's 12 blocks: after 3, 6 and 9,
            1-based, i.e. before blocks 4, 7, 10 as in the paper).
        ratio_weight: weight of the keep-ratio loss (authors' default 2.0), averaged over stages. The task's
            straight-through gradient on the predictors can dwarf it (a few dropped tokens whose keys
            dominate an attention row carry nearly all of it), and then training keeps more tokens than
            inference does; ``benchmarks/probe_dynamicvit_gradients.py`` measures the weight at which the
            two balance for a model (the Fashion-MNIST ViT of ``scripts/learned_table.sh``: 3e3 to 1e6, so
            that script trains at 20000).
        distill_weight: weight of the distillation losses when training with a teacher (0.5).
        attention_weight: weight of an extra training loss, not in the paper (0: none, the authors'
            method): at each stage the KL divergence from the head-averaged CLS attention of the block just
            run (over the kept patches, a fixed target) to the softmax over the kept patches of the
            predictor's keep-minus-drop logit, so the predictors start from the ranking that CLS-attention
            top-k already prunes well with (docs/RESULTS.md, Learned policies). It shapes only the ranking:
            a shift of every logit leaves it unchanged, so the counts stay the keep-ratio loss's.
        detach_predictors: in training the predictors read the residual stream without passing gradient
            back into it (not in the paper: there the task, ratio and any ranking loss reach the earlier
            blocks through the predictors' input). With large ratio or attention weights this keeps those
            losses from reshaping the backbone; the predictors still learn from all of them.

    Example:
        >>> import tokenopt
        >>> tokenopt.DynamicViT(rho=0.7).default_blocks(12)
        [2, 5, 8]
    """

    rho: float = 0.7
    blocks: Optional[tuple[int, ...]] = None
    ratio_weight: float = 2.0
    distill_weight: float = 0.5
    attention_weight: float = 0.0
    detach_predictors: bool = False
    name = "dynamicvit"
    site = "post_block"
    decides_differently_in_training = True

    def __post_init__(self):
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 < self.rho < 1:
            raise ValueError(f"dynamicvit: rho must be a float in (0, 1), the share kept per stage; got {self.rho!r}. "
                             "Example: rho=0.7")
        for field in ("ratio_weight", "distill_weight", "attention_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"dynamicvit: {field} must be a number >= 0; got {value!r}")
        if not isinstance(self.detach_predictors, bool):
            raise ValueError(f"dynamicvit: detach_predictors must be True or False; got {self.detach_predictors!r}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def default_blocks(self, depth):
        return sorted({max(0, round(depth * s / 4) - 1) for s in (1, 2, 3)} - {depth - 1})

    def stages(self, depth: int) -> list[int]:
        chosen = self.blocks if self.blocks is not None else self.default_blocks(depth)
        return sorted(b if b >= 0 else depth + b for b in chosen)

    def keep_ratios(self, depth: int) -> list[float]:
        return [self.rho ** (s + 1) for s in range(len(self.stages(depth)))]

    def decide(self, ctx):
        stages = self.stages(ctx.depth)
        if ctx.block.index == ctx.depth - 1:
            raise RewriteError(f"dynamicvit: block {ctx.block.index} is the last block; nothing runs after it on "
                               "fewer tokens. Choose earlier blocks, e.g. blocks=(2, 5, 8)")
        ctx.require_dense("a fixed token count")
        stage = stages.index(ctx.block.index)
        p = ctx.num_prefix
        x = ctx.x
        dim = ctx.width
        predictor = ctx.module(f"predictor{stage}", lambda: Predictor(dim))
        patches = ctx.call(aten.slice.Tensor, x, 1, p, None)
        if self.detach_predictors and ctx.training:
            patches = ctx.call(aten.detach.default, patches)
        weights = ctx.token_weights()  # [B, L] float (training mask or validity), None: every token is real
        if weights is None:
            ones = ctx.call(aten.ones_like.default, ctx.call(aten.select.int, patches, -1, 0), dtype=torch.float32)
            w = ctx.call(aten.unsqueeze.default, ones, -1)
        else:
            w = ctx.call(aten.unsqueeze.default, ctx.call(aten.slice.Tensor, weights, 1, p, None), -1)
        logp = ctx.call_module(predictor, patches, w, role="tokens.score")  # [B, P, 2]: keep, drop
        if ctx.training:
            noise = ctx.call(aten.exponential.default, ctx.call(aten.empty_like.default, logp))
            gumbel = ctx.call(aten.neg.default, ctx.call(aten.log.default, noise))
            hard = ctx.call(torch.ops.tokenopt.gumbel_keep.default, logp, gumbel)
            keep = ctx.call(aten.mul.Tensor, hard, ctx.call(aten.squeeze.dim, w, -1))  # once dropped, dropped
            ctx.aux("keep", keep)
            if self.attention_weight:
                cls = ctx.call(aten.mean.dim, ctx.cls_attention(), [1])  # [B, L], over the current tokens
                ctx.aux("cls_attention", ctx.call(aten.slice.Tensor, cls, 1, p, None))
                ctx.aux("logp", logp)
                ctx.aux("kept", ctx.call(aten.squeeze.dim, w, -1))
            if p:
                prefix = ctx.call(aten.ones_like.default, ctx.call(aten.slice.Tensor, ctx.call(aten.select.int, x, -1, 0), 1, 0, p),
                                  dtype=torch.float32)
                keep = ctx.call(aten.cat.default, [prefix, keep], 1)
            return Mask(keep)
        count = max(1, int(ctx.num_patches * self.rho ** (stage + 1)))
        if count >= ctx.tokens - p:
            return None
        score = ctx.call(aten.select.int, logp, -1, 0)
        if ctx.valid is not None:  # (masked form: padding never wins)
            score = ctx.call(aten.where.ScalarOther, ctx.call(aten.slice.Tensor, ctx.valid, 1, p, None), score, -math.inf)
        if p:  # topk_select takes a score per token and skips the first p columns itself
            score = ctx.call(aten.constant_pad_nd.default, score, [p, 0], 0.0)
        idx = ctx.call(torch.ops.tokenopt.topk_select.default, ctx.call(aten.unsqueeze.default, score, 1), count, p,
                       role="tokens.idx")
        return Keep(idx, p + count)

    def training_losses(self, aux: dict) -> dict:
        losses = dynamicvit_losses(self, list(aux.get("keep", ())))
        if self.attention_weight and aux.get("cls_attention"):
            stages = list(zip(aux["cls_attention"], aux["logp"], aux["kept"]))
            losses["attention"] = self.attention_weight * sum(attention_rank_loss(*s) for s in stages) / len(stages)
        return losses

    def training_stats(self, aux: dict) -> dict:
        """``keep<s>``: the share of the model's patches stage ``s`` kept in training (inference keeps
        ``rho ** s``); far above it, the predictors keep in training what inference drops."""
        return {f"keep{s + 1}": k.detach().float().mean() for s, k in enumerate(aux.get("keep", ()))}


def dynamicvit_losses(config: DynamicViT, keeps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keep-ratio loss: ``ratio_weight / stages * sum_s mean_b((mean_j keep_s[b, j] - rho ** s) ** 2)``."""
    if not keeps:
        return {}
    loss = sum(((k.float().mean(dim=1) - config.rho ** (s + 1)) ** 2).mean() for s, k in enumerate(keeps))
    return {"ratio": config.ratio_weight * loss / len(keeps)}


def attention_rank_loss(cls: torch.Tensor, logp: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``mean_b KL(a_b || softmax_j(z_b))`` over the kept patches: ``a`` the CLS attention ``cls`` ``[B, P]``
    renormalised over the patches still kept (``kept`` ``[B, P]``, 0 or 1; a fixed target), ``z`` the
    predictor's keep-minus-drop logit from ``logp`` ``[B, P, 2]``."""
    on = kept > 0
    a = cls.detach().float() * on
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    z = (logp[..., 0] - logp[..., 1]).float().masked_fill(~on, -1e4)  # (finite: a is 0 there, 0 * -1e4 = 0)
    return (a * (a.clamp_min(1e-12).log() - z.log_softmax(1))).sum(1).mean()
