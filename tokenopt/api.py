"""The public face: ``optimize``, ``capture`` and ``explain``."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp

from tokenopt.capture import capture, release_fake_caches, unwrap
from tokenopt.explain import block_listing, block_stats, token_counts
from tokenopt.ir import META_BLOCK, META_ROLE, MODEL_INFO, ModelInfo
from tokenopt.module import OptimizedModule, carried_attributes, measure_min_batch, signature_of
from tokenopt.passes import find_blocks
from tokenopt.passes.find_blocks import BlocksNotRecognisedWarning, NoAttentionError
from tokenopt.passes.fuse_kernels import FuseKernels, resolve_backend
from tokenopt.passes.realize import MODES, RealizeTokens, RewriteError
from tokenopt.pipeline import Pipeline, ShapeCheckError
from tokenopt.policies import PolicyConfig, make_config

__all__ = ["optimize"]


def optimize(
    model: torch.nn.Module,
    policy: Union[str, PolicyConfig, Sequence] = "ats",
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    mode: Optional[str] = None,
    kernels: str = "auto",
    share_weights: bool = False,
    min_batch: Union[None, int, str] = None,
    dense: bool = False,
    policy_state: Optional[dict] = None,
    **options: Any,
) -> OptimizedModule:
    """Capture ``model``, find its transformer blocks and rewrite the graph to reduce tokens.

    Args:
        model: a Vision Transformer; it is not modified.
        policy: a policy alias (``"none"``, ...), a config instance, or a list of them (run in one
            graph, each deciding on the tokens the previous ones left).
        example_inputs: one call's positional inputs; a random batch of the model's configured image
            size when omitted. The result runs at any batch size.
        mode: how decisions are executed (:mod:`tokenopt.passes.realize`): ``"padded"``, ``"masked"``
            (nothing removed; differentiable) or ``"packed"`` (per-image counts, ragged). Default: what
            the policy asks for (ATS: its ``mode``, packed), else ``"padded"``.
        kernels: ``"auto"`` swaps the reference token ops for fused Triton kernels when the model is on
            CUDA and Triton imports, ``"triton"`` always does, ``"reference"`` never
            (:mod:`tokenopt.passes.fuse_kernels`).
        share_weights: the result uses the model's own parameters instead of copies (saves memory; then
            ``gm.half()``, ``gm.requires_grad_()`` or an optimizer step on ``gm`` change ``model`` too).
        min_batch: batches smaller than this run the original, unreduced graph (same weights): an int,
            or ``"auto"`` to measure once on this machine where the reduced graph starts to be faster
            (:func:`tokenopt.module.measure_min_batch`). Default: always reduce.
        dense: after the last block, restore the full token grid ``[B, N, C]`` (kept tokens in their
            places, a merged token copied to every position it absorbed, a dropped token as it was when
            dropped), so a head that reads every token (segmentation, dense features) still works.
            Padded or masked execution (the default becomes padded).
        policy_state: the trained weights of a learned policy's own modules (DynamicViT's predictors):
            ``TrainingModule.policy_state_dict()``, or the ``policy.pt`` that ``tokenopt train`` writes
            (a path is loaded).
        **options: fields of the policy's config (``keep_rate=0.7`` for ``"topk"``, ...).

    Returns:
        An :class:`~tokenopt.module.OptimizedModule` (a ``torch.fx.GraphModule``) with the model's inputs
        (by position or keyword), output structure and runner-facing attributes. ``gm.meta`` holds the
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
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"tokenopt.optimize takes an nn.Module; got {type(model).__name__}")
    model = unwrap(model)  # torch.compile's wrapper, DataParallel: the model inside
    if not isinstance(dense, bool):
        raise ValueError(f"dense must be True or False; got {dense!r}")
    if mode is None:
        mode = "padded" if dense else config.default_mode() or "padded"
    if mode == "ragged":
        mode = "packed"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if min_batch is not None and min_batch != "auto" and (
            not isinstance(min_batch, int) or isinstance(min_batch, bool) or min_batch < 1):
        raise ValueError(f"min_batch must be a positive int, 'auto' or None; got {min_batch!r}")
    if not isinstance(share_weights, bool):
        raise ValueError(f"share_weights must be True or False; got {share_weights!r}")
    gm = capture(model, example_inputs)
    if mode == "packed" and gm.meta.get("tokenopt.static_batch") is not None:
        raise RewriteError(
            f"{type(model).__name__}: the packed (ragged) realisation lays every image's tokens out in one "
            f"buffer, which needs the batch size symbolic, but torch.export fixed it at "
            f"{gm.meta['tokenopt.static_batch']} (the model's forward reads it as a Python number, most often "
            "len(x)). Fix: write x.shape[0] in the model's forward, or pass mode='padded'")
    generic = gm.meta.pop("tokenopt.generic", None)
    resolve_backend(kernels, gm)  # reject a bad value before any rewriting
    build = {"mode": mode, "kernels": kernels, "dense": dense, "keep_original": min_batch is not None}
    if isinstance(policy_state, (str, bytes)) or hasattr(policy_state, "__fspath__"):
        policy_state = torch.load(policy_state, map_location="cpu", weights_only=True)
    gm, original = _build(gm, config, build, policy_state=policy_state)
    out = OptimizedModule.wrap(
        gm, signature=signature_of(model, len(gm.meta["tokenopt.example_inputs"])),
        carried=carried_attributes(model), original=original, generic=generic, own_weights=not share_weights)
    if min_batch == "auto":
        min_batch = measure_min_batch(out, out.meta["tokenopt.example_inputs"])
    out.min_batch = min_batch
    out.meta["tokenopt.min_batch"] = min_batch
    release_fake_caches(generic)  # (the reduced and original graphs: in _build)
    return out


def _build(gm: fx.GraphModule, config: PolicyConfig, build: dict, policy_state: Optional[dict] = None
           ) -> tuple[fx.GraphModule, Optional[fx.GraphModule]]:
    """Run the pipeline on a captured graph: returns the reduced graph and, when asked for, the captured
    (unreduced) graph beside it. Also what an OptimizedModule calls for an image size it has not seen."""
    examples = gm.meta["tokenopt.example_inputs"]
    original = fx.GraphModule(gm, _copy_graph(gm.graph)) if build.get("keep_original") else None
    passes = [find_blocks, *config.passes()]
    if len(passes) == 1:  # policy "none": a model whose blocks are not recognised still runs, as captured
        passes = [_find_blocks_or_leave_alone]
    if len(passes) > 2:
        passes.append(RealizeTokens(build["mode"], dense=build["dense"], training=build.get("training", False),
                                    policy_state=policy_state))
    elif policy_state:
        raise ValueError(f"policy_state is for a learned policy's modules; {config!r} has none")
    passes.append(FuseKernels(build["kernels"]))
    pipeline = Pipeline(passes, policy=config.name, on_start=_record_baseline)
    try:
        gm = pipeline.run(gm)
    except ShapeCheckError as exc:
        raise _located_error(config, exc.node, exc.cause) from exc
    _check_on_example(gm, examples, config)
    _warn_partial_coverage(gm, config)
    gm.meta["tokenopt.example_token_counts"] = token_counts(gm, *examples)
    gm.meta["tokenopt.policy"] = config
    gm.meta["tokenopt.pass_records"] = pipeline.records
    gm.meta["tokenopt.build"] = dict(build)
    release_fake_caches(gm, original)  # every build: optimize, a new image size, calibration, training
    return gm, original


class PartialCoverageWarning(UserWarning):
    """A reduction acts on fewer attention layers than the model has: the rest run as captured."""


def _warn_partial_coverage(gm: fx.GraphModule, config: PolicyConfig) -> None:
    """Say so when attention outside the recognised blocks runs unreduced, or the policy reduced nothing."""
    if config.name == "none" or not gm.meta.get(MODEL_INFO) or not gm.meta[MODEL_INFO].blocks:
        return
    skipped = gm.meta.get("tokenopt.unrecognised_attention") or []
    realized = gm.meta.get("tokenopt.counters", {}).get("realize_tokens", {})
    notes = []
    if skipped:
        notes.append(f"attention in {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''} is not recognised as "
                     "an attention block (its softmax is not a plain softmax(q k^T) feeding the product with the "
                     "values, or there is no [B, N, C] residual around it); it runs as captured, unreduced")
    if realized and realized.get("decisions", 0) == 0:
        notes.append(f"{config!r} made no reduction in any block (budgets of 0, or nothing to act on)")
    if notes:
        gm.meta["tokenopt.coverage"] = notes
        warnings.warn(PartialCoverageWarning("; ".join(notes)), stacklevel=3)


def _find_blocks_or_leave_alone(gm: fx.GraphModule):
    """find_blocks for ``policy="none"``: where it cannot describe the model's blocks, the captured graph is
    kept as it is (it equals the model), with an empty ModelInfo and a warning naming what was not
    recognised and why (so nothing later pretends to reduce it). A model with no attention at all (a CNN,
    an MLP) is still refused: tokenopt has nothing to do there."""
    try:
        return find_blocks(gm)
    except Exception as exc:
        if isinstance(exc, NoAttentionError) and not exc.unrecognised:
            raise
        reason = str(exc) if getattr(exc, "user_error", False) else f"find_blocks failed: {type(exc).__name__}: {exc}"
    for node in gm.graph.nodes:  # tags a failed analysis may have left
        node.meta.pop(META_BLOCK, None)
        node.meta.pop(META_ROLE, None)
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    gm.meta[MODEL_INFO] = ModelInfo(blocks=[], token_axis=1, num_prefix_tokens=0, num_patch_tokens=0,
                                    head_readers=[], image_input=image)
    gm.meta["tokenopt.not_recognised"] = reason
    warnings.warn(BlocksNotRecognisedWarning(
        f"{gm.meta.get('tokenopt.source', 'the model')}: optimize(policy='none') returns the captured graph "
        f"unchanged (it equals the model), but no token reduction can apply to this model: {reason}"),
        stacklevel=2)
    return PassResult(gm, False)


_find_blocks_or_leave_alone.pass_name = "find_blocks"
_find_blocks_or_leave_alone.ensures = ("model_info",)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (nodes, meta, input/output convention) that later passes leave alone."""
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _record_baseline(gm: fx.GraphModule, pass_name: str) -> None:
    """After find_blocks: keep the captured blocks' listings and FLOPs, for explain."""
    if pass_name == "find_blocks":
        gm.meta["tokenopt.captured_blocks"] = {
            b.index: block_listing(gm, b.index) for b in gm.meta[MODEL_INFO].blocks
        }
        gm.meta["tokenopt.baseline_flops"] = sum(r["flops"] for r in block_stats(gm))


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
        raise _located_error(config, getattr(prop, "_tokenopt_node", None), exc.__cause__ or exc) from exc


def _located_error(config, node: Optional[fx.Node], cause: BaseException) -> RewriteError:
    """The rewritten graph fails at ``node`` (on the example, or in fake-tensor propagation)."""
    return RewriteError(
        f"the graph rewritten for {config!r} fails on the example inputs"
        + (f" at node {node.name} ({_where(node)})" if node is not None else "")
        + f": {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
        "A part of the model that is sized for the full token count (rotary or relative position "
        "tables, fixed-size masks) usually causes this: reduce tokens only in blocks after it "
        "(blocks=...) or choose a policy that keeps the count (policy='none')."
    )


def _where(node: fx.Node) -> str:
    block = node.meta.get(META_BLOCK)
    if block is not None:
        return f"block {block}"
    path = list((node.meta.get("nn_module_stack") or {}).values())
    return f"between blocks, in {path[-1][0] or 'the top module'}" if path else "between blocks"
