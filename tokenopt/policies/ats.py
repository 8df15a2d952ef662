"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022). Training-free, per-image token counts."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from tokenopt.passes.canonicalize import canonicalize_attention
from tokenopt.passes.reduce_tokens import InsertATS
from tokenopt.policies._checks import check_blocks, check_count_or_share, check_int
from tokenopt.policies.base import PolicyConfig, register_policy

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
        mode: how per-image token counts are batched: ``"ragged"`` (packed tokens, the default and
            the fast one), ``"padded"`` (pad to the batch's largest count and mask) or ``"masked"``
            (drop nothing, only mask: the published code's behaviour, for comparison).

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

    def __post_init__(self):
        if self.mode not in ("ragged", "padded", "masked"):
            raise ValueError(f"ats: mode must be 'ragged', 'padded' or 'masked'; got {self.mode!r}")
        check_count_or_share(self.name, "max_tokens", self.max_tokens)
        check_int(self.name, "min_tokens", self.min_tokens, 0)
        object.__setattr__(self, "blocks", check_blocks(self.name, self.blocks))

    def passes(self):
        return [canonicalize_attention, InsertATS(self.blocks, self.max_tokens, self.min_tokens, self.mode)]
