"""The public face: ``optimize``, ``capture`` and ``explain``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from tokenopt.capture import capture
from tokenopt.explain import block_listing, block_stats, token_counts
from tokenopt.ir import MODEL_INFO
from tokenopt.passes import find_blocks
from tokenopt.pipeline import Pipeline
from tokenopt.policies import PolicyConfig, make_config

__all__ = ["optimize"]


def optimize(
    model: torch.nn.Module,
    policy: Union[str, PolicyConfig] = "ats",
    example_inputs: Optional[Sequence[Any]] = None,
    **options: Any,
) -> fx.GraphModule:
    """Capture ``model``, find its transformer blocks and rewrite the graph to reduce tokens.

    Args:
        model: a Vision Transformer; it is not modified.
        policy: a policy alias (``"none"``, ...) or a config instance.
        example_inputs: one call's positional inputs; a random batch of the model's configured image
            size when omitted. The result runs at any batch size.
        **options: fields of the policy's config (``keep_rate=0.7`` for ``"topk"``, ...).

    Returns:
        A ``torch.fx.GraphModule`` with the model's inputs and output structure. ``gm.meta`` holds the
        :class:`~tokenopt.ir.ModelInfo` (``"tokenopt.model_info"``), the config (``"tokenopt.policy"``)
        and what each pass did (``"tokenopt.pass_records"``).

    Example:
        >>> import torch, timm, tokenopt
        >>> model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
        >>> gm = tokenopt.optimize(model, policy="none")
        >>> x = torch.randn(3, 3, 224, 224)
        >>> torch.testing.assert_close(gm(x), model(x))
    """
    config = make_config(policy, **options)
    gm = capture(model, example_inputs)
    examples = gm.meta["tokenopt.example_inputs"]
    find_blocks(gm)
    gm.meta["tokenopt.captured_blocks"] = {
        b.index: block_listing(gm, b.index) for b in gm.meta[MODEL_INFO].blocks
    }
    gm.meta["tokenopt.baseline_flops"] = sum(r["flops"] for r in block_stats(gm))
    pipeline = Pipeline(config.passes(), policy=config.name)
    gm = pipeline.run(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(*examples)
    gm.meta["tokenopt.example_token_counts"] = token_counts(gm, *examples)
    gm.meta["tokenopt.policy"] = config
    gm.meta["tokenopt.pass_records"] = pipeline.records
    return gm
