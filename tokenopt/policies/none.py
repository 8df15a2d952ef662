"""The identity policy: capture and analyse, change nothing."""

from __future__ import annotations

import dataclasses

from tokenopt.policies.base import PolicyConfig, register_policy

__all__ = ["NoReduction"]


@register_policy
@dataclasses.dataclass(frozen=True)
class NoReduction(PolicyConfig):
    """Keep every token. ``optimize(model, policy="none")`` equals the eager model."""

    name = "none"

    def passes(self):
        return []
