"""Running passes: a registry, and a pipeline that lints, recompiles and records provenance.

A pass is any callable ``GraphModule -> PassResult`` (``torch.fx.passes.infra.pass_base.PassResult``);
returning ``None`` counts as "modified in place". The pipeline runs passes in order and after each one

* stamps ``node.meta[META_PROVENANCE] = {"pass": name, "policy": policy}`` on every node it created,
* lints the graph and recompiles the module,
* checks what it ``requires`` (facts an earlier pass ``ensures``: ``"model_info"`` from
  ``find_blocks``, ``"plan"`` from the policy passes) and re-derives tensor facts after every pass
  that changed the graph: ``node.meta["val"]`` by fake-tensor propagation from the inputs' symbolic
  shapes, so what a later pass reads is true of the graph it sees,
* on any exception raises :class:`PassError` naming the pass, the passes before it and, when the
  failure is tied to a node, that node.

Example (a user pass; this exact code is a test in ``tests/test_pipeline.py``):

    >>> import torch, timm, tokenopt
    >>> from tokenopt.pipeline import register_pass, Pipeline
    >>> from torch.fx.passes.infra.pass_base import PassResult
    >>> @register_pass("count_linears")
    ... def count_linears(gm):
    ...     gm.meta["linears"] = sum(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes)
    ...     return PassResult(gm, False)
    >>> gm = tokenopt.capture(timm.create_model("deit_tiny_patch16_224", depth=2))
    >>> gm = Pipeline(["find_blocks", "count_linears"]).run(gm)
    >>> gm.meta["linears"]
    9
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import META_PROVENANCE, MODEL_INFO

__all__ = ["PassError", "PassRecord", "Pipeline", "refresh_tensor_meta", "register_pass", "get_pass", "registered_passes"]

PassFn = Callable[[fx.GraphModule], Optional[PassResult]]
_REGISTRY: dict[str, PassFn] = {}


class PassError(RuntimeError):
    """A pass failed; the message names it, the passes that ran before it and the node involved."""


class ShapeCheckError(PassError):
    """A rewritten graph's shapes no longer fit at ``node`` (found by fake-tensor propagation)."""

    def __init__(self, message: str, node: Optional[fx.Node], cause: BaseException):
        super().__init__(message)
        self.node, self.cause = node, cause


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` under ``name`` so pipelines can name it. Re-registering a name replaces it."""

    def deco(fn: PassFn) -> PassFn:
        _REGISTRY[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def get_pass(name: str) -> PassFn:
    if name not in _REGISTRY:
        raise KeyError(f"no pass named {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_passes() -> list[str]:
    return sorted(_REGISTRY)


def _pass_name(p: PassFn) -> str:
    return getattr(p, "pass_name", None) or getattr(p, "__name__", None) or type(p).__name__


@dataclass
class PassRecord:
    """What one pass did: its name, whether it changed the graph, nodes added/removed, seconds."""

    name: str
    modified: bool
    added: int
    removed: int
    seconds: float


@dataclass
class Pipeline:
    """An ordered list of passes (callables or registered names) run with checks between them.

    Args:
        passes: the passes, each a callable or a name given to :func:`register_pass`.
        policy: recorded in the provenance of every node the passes create.
    """

    passes: Sequence[Union[str, PassFn]]
    policy: str = "custom"
    records: list[PassRecord] = field(default_factory=list)
    on_start: Optional[Callable[[fx.GraphModule, str], None]] = None  # called after each pass, with its name
    refresh: bool = True

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Run every pass on ``gm`` in order; returns the resulting GraphModule."""
        done: list[str] = []
        facts = set(gm.meta.get("tokenopt.facts", ()))
        if MODEL_INFO in gm.meta:
            facts.add("model_info")
        for p in self.passes:
            fn = get_pass(p) if isinstance(p, str) else p
            name = p if isinstance(p, str) else _pass_name(fn)
            missing = [r for r in getattr(fn, "requires", ()) if r not in facts]
            if missing:
                ran = ", ".join(done) if done else "none"
                raise PassError(f"pass {name!r} requires {', '.join(missing)}, which no pass before it ensures "
                                f"(passes that ran before it: {ran}); 'model_info' comes from 'find_blocks', "
                                "'plan' from a policy's decision pass")
            before = set(gm.graph.nodes)
            start = time.perf_counter()
            try:
                result = fn(gm)
                if result is not None:
                    gm = result.graph_module
                after = set(gm.graph.nodes)
                for node in after - before:
                    prov = node.meta.setdefault(META_PROVENANCE, {})
                    prov.setdefault("pass", name)
                    prov.setdefault("policy", self.policy)
                gm.graph.lint()
                modified = result.modified if result is not None else True
                if modified or after != before:  # (a pass that changed nothing keeps the code it had)
                    gm.recompile()
            except PassError:
                raise
            except Exception as exc:
                if getattr(exc, "user_error", False):
                    raise  # it already names the model part and the fix
                node = getattr(exc, "node", None)
                where = f" at node {node.name} ({node.format_node()})" if isinstance(node, fx.Node) else ""
                ran = ", ".join(done) if done else "none"
                raise PassError(
                    f"pass {name!r} failed{where}: {type(exc).__name__}: {exc}\n(passes that ran before it: {ran})"
                ) from exc
            if modified and self.refresh:
                refresh_tensor_meta(gm, name)
            facts.update(getattr(fn, "ensures", ()))
            gm.meta["tokenopt.facts"] = sorted(facts)
            if self.on_start is not None:
                self.on_start(gm, name)
            self.records.append(
                PassRecord(name, modified, len(after - before), len(before - after), time.perf_counter() - start)
            )
            done.append(name)
        return gm


def refresh_tensor_meta(gm: fx.GraphModule, after: str = "") -> None:
    """Re-derive ``node.meta["val"]`` of every node by fake-tensor propagation from the placeholders'
    recorded (symbolic) values. A graph whose shapes no longer fit raises :class:`ShapeCheckError`
    naming the node."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next((v.fake_mode for v in inputs if isinstance(v, FakeTensor)), None)
    if mode is None:
        return
    prev = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True  # parameters are real tensors
    class _Prop(FakeTensorProp):
        def run_node(self, n):
            self.current = n
            return super().run_node(n)

    prop = _Prop(gm, mode)
    try:
        prop.propagate_dont_convert_inputs(*inputs)
    except Exception as exc:
        node = getattr(prop, "current", None)
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ShapeCheckError(f"after pass {after!r} the graph's shapes do not fit at node "
                              f"{node.name if node is not None else '?'}: {type(cause).__name__}: {first}",
                              node, cause) from exc
    finally:
        mode.allow_non_fake_inputs = prev
