"""Graph passes over captured ViTs: analyses that write ``node.meta`` and rewrites that use it."""

from tokenopt.passes.find_blocks import BlockStructureError, NoAttentionError, find_blocks, get_model_info
from tokenopt.passes.canonicalize import canonicalize_attention
from tokenopt.passes.realize import MODES, DecisionContext, RealizeTokens, RewriteError
from tokenopt.passes.retarget import retarget_token_sizes
from tokenopt.passes.fuse_kernels import FuseKernels, fuse_kernels
from tokenopt.pipeline import register_pass

register_pass("find_blocks")(find_blocks)
register_pass("canonicalize_attention")(canonicalize_attention)
register_pass("fuse_kernels")(fuse_kernels)

__all__ = [
    "BlockStructureError", "NoAttentionError", "RewriteError", "find_blocks", "get_model_info",
    "canonicalize_attention", "MODES", "DecisionContext", "RealizeTokens", "retarget_token_sizes",
    "FuseKernels", "fuse_kernels",
]
