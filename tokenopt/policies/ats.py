"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022). Training-free, per-image token counts."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from tokenopt.ir import Keep
from tokenopt.passes.realize import RewriteError
from tokenopt.policies._checks import check_blocks, check_count_or_share, check_int
from tokenopt.policies.base import PolicyConfig, register_policy, require_cls

__all__ = ["ATS"]


@register_policy
@dataclasses.dataclass(frozen=True)
class ATS(PolicyConfig):
    """Adaptive token sampling inside attention.

    Args:
        max_tokens: K, the most patch tokens an image keeps in each chosen block: a count, or a share
            of the model's patch tokens. Default 0.5 is tokenopt's choice, not the paper's: sweep it
            with ``tokenopt bench`` for your accuracy/latency target.
        min_tokens: floor of kept patch tokens per image (ATS keeps at least a few; default 8).
        blocks: where to sample; default every block from the 4th on (ATS: blocks 4..12 of DeiT).
        mode: the execution form it asks for (``optimize(mode=...)`` overrides it): ``"ragged"``
            (= ``"packed"``: per-image counts packed, the default and the fast one), ``"padded"`` (padded
            to the static capacity ``max_tokens`` and masked: no host sync) or ``"masked"`` (drop
            nothing, only mask: the published code's behaviour and the training form).

    Example:
        >>> import tokenopt
        >>> tokenopt.ATS(max_tokens=0.4).max_tokens
        0.4
        >>> tokenopt.ATS(max_tokens=0)
        Traceback (most recent call last):
        ...
        ValueError: ats: max_tokens must be a token count (int >= 1) or a share of the patch tokens (float in (0, 1]); got 0. Example: max_tokens=98 or max_tokens=0.5
    """

    max_tokens: Union[int, float] = 0.5
    min_tokens: int = 8
    blocks: Optional[tuple[int, ...]] = None
    mode: str = "ragged"
    name = "ats"
    site = "attn"  # ATS samples inside attention: only the sampled tokens go on as queries
    adaptive = True

    def __post_init__(self):
        if self.mode not in ("ragged", "packed", "padded", "masked"):
            raise ValueError(f"ats: mode must be 'ragged' (= 'packed'), 'padded' or 'masked'; got {self.mode!r}")
        check_count_or_share(self.name, "max_tokens", self.max_tokens)
        check_int(self.name, "min_tokens", self.min_tokens, 0)
        if isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens:
            raise ValueError(f"ats: min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens}): an image "
                             f"would keep more than max_tokens; lower min_tokens, e.g. min_tokens={self.max_tokens}")
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def default_blocks(self, depth):
        return range(3, depth)  # ATS samples in blocks 4..12 of DeiT

    def default_mode(self):
        return "packed" if self.mode == "ragged" else self.mode

    def decide(self, ctx):
        """Score the patch tokens by CLS attention x value norm and keep an inverse-transform sample."""
        require_cls(ctx, "ATS")
        p = ctx.num_prefix
        k = self.max_tokens if isinstance(self.max_tokens, int) else math.ceil(self.max_tokens * ctx.num_patches)
        if self.min_tokens > k:
            raise RewriteError(f"ats: min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens} = {k} of "
                               f"this model's {ctx.num_patches} patches); lower min_tokens or raise max_tokens")
        width = min(max(k, self.min_tokens), ctx.length - p)  # a static bound on every image's count
        sel = ctx.call(torch.ops.tokenopt.ats_select.default, ctx.cls_attention(), ctx.value_norms(), p, k,
                       self.min_tokens, ctx.valid, width, role="tokens.select")
        idx, valid = ctx.call.items(sel, 2, roles=("tokens.idx", "tokens.valid"))
        return Keep(idx, p + width, valid=valid)
