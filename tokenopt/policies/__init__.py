"""Policies: one file each, a frozen config plus the list of passes it runs."""

from tokenopt.policies.base import PolicyConfig, available_policies, make_config, register_policy
from tokenopt.policies.none import NoReduction

__all__ = ["PolicyConfig", "available_policies", "make_config", "register_policy", "NoReduction"]
