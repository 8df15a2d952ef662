"""The public face: ``optimize``, ``capture`` and ``explain``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from tokenopt.capture import capture
from tokenopt.explain import block_listing, block_stats, token_counts
from tokenopt.ir import META_BLOCK, MODEL_INFO
from tokenopt.passes.reduce_tokens import RewriteError
from tokenopt.passes import find_blocks
from tokenopt.passes.fuse_kernels import FuseKernels, resolve_backend
from tokenopt.pipeline import Pipeline
from tokenopt.policies import PolicyConfig, make_config

__all__ = ["optimize"]


def optimize(
    model: torch.nn.Module,
    policy: Union[str, PolicyConfig] = "ats",
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    kernels: str = "auto",
    **options: Any,
) -> fx.GraphModule:
    """Capture ``model``, find its transformer blocks and rewrite the graph to reduce tokens.

    Args:
        model: a Vision Transformer; it is not modified.
        policy: a policy alias (``"none"``, ...) or a config instance.
        example_inputs: one call's positional inputs; a random batch of the model's configured image
            size when omitted. The result runs at any batch size.
        kernels: ``"auto"`` swaps the reference token ops for fused Triton kernels when the model is on
            CUDA and Triton imports, ``"triton"`` always does, ``"reference"`` never
            (:mod:`tokenopt.passes.fuse_kernels`).
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
    resolve_backend(kernels, gm)  # reject a bad value before any rewriting
    pipeline = Pipeline([*config.passes(), FuseKernels(kernels)], policy=config.name)
    gm = pipeline.run(gm)
    _check_on_example(gm, examples, config)
    gm.meta["tokenopt.example_token_counts"] = token_counts(gm, *examples)
    gm.meta["tokenopt.policy"] = config
    gm.meta["tokenopt.pass_records"] = pipeline.records
    return gm


def _check_on_example(gm: fx.GraphModule, examples, config) -> None:
    """Run the rewritten graph once on the example inputs (recording shapes); on failure, name the
    node and block, since a model part sized for the full token count is the usual cause."""
    class _Prop(ShapeProp):
        def run_node(self, n):
            self._tokenopt_node = n
            return super().run_node(n)

    prop = _Prop(gm)
    try:
        with torch.no_grad():
            prop.propagate(*examples)
    except Exception as exc:
        node = getattr(prop, "_tokenopt_node", None)
        cause = exc.__cause__ or exc
        raise RewriteError(
            f"the graph rewritten for {config!r} fails on the example inputs"
            + (f" at node {node.name} ({_where(node)})" if node is not None else "")
            + f": {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
            "A part of the model that is sized for the full token count (rotary or relative position "
            "tables, fixed-size masks) usually causes this: reduce tokens only in blocks after it "
            "(blocks=...) or choose a policy that keeps the count (policy='none')."
        ) from exc


def _where(node: fx.Node) -> str:
    block = node.meta.get(META_BLOCK)
    if block is not None:
        return f"block {block}"
    path = list((node.meta.get("nn_module_stack") or {}).values())
    return f"between blocks, in {path[-1][0] or 'the top module'}" if path else "between blocks"
