"""Policies: one file each, a frozen config that decides; tokenopt.passes.realize executes."""

from tokenopt.policies.base import (Composite, PlanDecisions, PolicyConfig, available_policies, make_config,
                                    register_policy)
from tokenopt.policies.adavit import AdaViT
from tokenopt.policies.ats import ATS
from tokenopt.policies.avit import AViT
from tokenopt.policies.dynamicvit import DynamicViT
from tokenopt.policies.none import NoReduction
from tokenopt.policies.pitome import PiToMe
from tokenopt.policies.sait import SaiT
from tokenopt.policies.tome import ToMe
from tokenopt.policies.topk import TopK

__all__ = ["PolicyConfig", "Composite", "PlanDecisions", "available_policies", "make_config", "register_policy",
           "NoReduction", "AdaViT", "ATS", "AViT", "DynamicViT", "PiToMe", "SaiT", "TopK", "ToMe"]
