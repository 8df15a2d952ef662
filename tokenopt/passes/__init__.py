"""Graph passes over captured ViTs: analyses that write ``node.meta`` and rewrites that use it."""

from tokenopt.passes.find_blocks import BlockStructureError, NoAttentionError, find_blocks, get_model_info
from tokenopt.pipeline import register_pass

register_pass("find_blocks")(find_blocks)

__all__ = ["BlockStructureError", "NoAttentionError", "find_blocks", "get_model_info"]
