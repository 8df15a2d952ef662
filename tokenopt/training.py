"""The training path: ``tokenopt.prepare_training(model, policy=...)``.

The model is captured in its training form (dropout and stochastic depth active, as ``model.train()``
runs it) and the policy is realised *masked*: every token stays in the buffer, decisions become masks
and attention biases, and every token op has autograd, so the graph trains like the model. What the
policy needs for its auxiliary losses (A-ViT: the halting scores of every block and the ponder counts)
is returned by the graph beside the model's output and turned into losses by the policy
(:meth:`TrainingModule.aux_losses`).

The returned :class:`TrainingModule` is an :class:`~tokenopt.module.OptimizedModule` with weights of its
own and the model's parameter names, so ``model.load_state_dict(tm.state_dict())`` puts the trained
weights back into the original architecture: an ordinary checkpoint, which
``tokenopt.optimize(model, policy=...)`` then turns into the inference graph (packed: halted tokens
gone).

    >>> import torch, timm, tokenopt
    >>> model = timm.create_model("deit_tiny_patch16_224", depth=2, num_classes=10)
    >>> tm = tokenopt.prepare_training(model, policy="avit")
    >>> logits = tm(torch.randn(2, 3, 224, 224))
    >>> sorted(tm.aux_losses())
    ['ponder', 'prior']
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from tokenopt.capture import capture
from tokenopt.module import OptimizedModule, _share, carried_attributes, signature_of
from tokenopt.policies import PolicyConfig, make_config

__all__ = ["prepare_training", "TrainingModule"]


class TrainingModule(OptimizedModule):
    """The masked training graph. ``tm(x)`` returns the model's output; the auxiliary values of that call
    are kept (``tm.aux``) and :meth:`aux_losses` turns them into the policy's weighted losses."""

    def __call__(self, *args, **kwargs):
        eval_graph = self.__dict__.get("_eval_graph")
        if eval_graph is not None and not self.training:  # the policy decides differently at inference
            if kwargs:
                args = self.bind_inputs(args, kwargs)
            self.check_inputs(args)
            out, aux = eval_graph(*args)
        else:
            out, aux = super().__call__(*args, **kwargs)
        self.__dict__["aux"] = aux
        return out

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.__dict__.get("_eval_graph") is not None:
            self.__dict__["_eval_graph"]._apply(fn, recurse)
        return self

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """The policy's auxiliary losses of the last call, each already weighted by its config."""
        return self.meta["tokenopt.policy"].training_losses(self._last_aux("losses"))

    def training_stats(self) -> dict[str, torch.Tensor]:
        """What the policy's decisions used in the last call (:meth:`PolicyConfig.training_stats`: e.g.
        DynamicViT's kept share per stage), for logs; not losses."""
        return self.meta["tokenopt.policy"].training_stats(self._last_aux("statistics"))

    def _last_aux(self, what: str) -> dict:
        aux = self.__dict__.get("aux")
        if aux is None:
            raise RuntimeError(f"call the training module on a batch first; its {what} come from that call")
        return aux

    @property
    def eval_graph(self) -> fx.GraphModule:
        """The graph ``eval()`` runs: the inference decisions, masked (this module's own graph when the
        policy decides the same way in training and inference)."""
        return self.__dict__.get("_eval_graph") or self

    def halting_scores(self) -> list[torch.Tensor]:
        """A-ViT: the halting score of every token at every halting block of the last call."""
        return list((self.__dict__.get("aux") or {}).get("scores", ()))


def _append_outputs(gm: fx.GraphModule, extra: dict[str, Any]) -> None:
    """Make ``gm`` return ``(original output, extra)`` (``extra`` a pytree of graph nodes)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    spec = getattr(gm, "_out_spec", None)
    flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    leaves, extra_spec = pytree.tree_flatten(extra)
    original = pytree.tree_unflatten(list(range(len(flat))), spec) if spec is not None else flat[0]
    new_spec = pytree.tree_structure((original, pytree.tree_unflatten(list(range(len(leaves))), extra_spec)))
    out.args = (tuple(flat + leaves),)
    codegen = gm.graph._codegen
    if hasattr(codegen, "pytree_info"):
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=new_spec)
    gm._out_spec = new_spec
    gm.recompile()


def prepare_training(
    model: torch.nn.Module,
    policy: Union[str, PolicyConfig] = "avit",
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    policy_state: Optional[dict] = None,
    dense: bool = False,
    **options: Any,
) -> TrainingModule:
    """Capture ``model`` in training form with ``policy`` realised masked (differentiable).

    Args:
        model: the ViT; it is not modified (the training module has its own copy of the weights).
        policy: a policy alias or config (``"avit"``, ``tokenopt.AViT(gamma=..., ...)``, ...).
        example_inputs: one call's inputs (default: a random batch of the model's input size).
        policy_state: weights for a learned policy's modules to start from (default: their seeded
            initialisation).
        dense: for a model whose output is every token (``Dinov2Model``, ``CLIPVisionModel``): as in
            :func:`tokenopt.optimize`, the output keeps the full token grid, a dropped token as it was
            when dropped, so the training graph and ``optimize(..., dense=True)`` agree.
        **options: fields of the policy's config.

    Returns:
        A :class:`TrainingModule`; put it in an ordinary training loop and add
        ``sum(tm.aux_losses().values())`` to the task loss.
    """
    from tokenopt.api import _build  # (api imports this module's neighbours; avoid a cycle)

    config = make_config(policy, **options)
    if not isinstance(dense, bool):
        raise ValueError(f"dense must be True or False; got {dense!r}")
    if isinstance(policy_state, (str, bytes)) or hasattr(policy_state, "__fspath__"):
        policy_state = torch.load(policy_state, map_location="cpu", weights_only=True)
    gm = capture(model, example_inputs, train=True, dynamic_size=False)
    gm.meta.pop("tokenopt.generic", None)
    build = {"mode": "masked", "kernels": "reference", "dense": dense, "keep_original": False, "training": True}
    gm, _ = _build(gm, config, build, policy_state=policy_state)
    _append_outputs(gm, _aux_nodes(gm))
    tm = TrainingModule.wrap(gm, signature=signature_of(model, len(gm.meta["tokenopt.example_inputs"])),
                             carried=carried_attributes(model), own_weights=True)
    if any(p.decides_differently_in_training for p in config.policies()):
        # eval(): the inference decisions, still masked (the graph optimize() emits, with nothing removed)
        ev = capture(model, example_inputs, dynamic_size=False)
        ev.meta.pop("tokenopt.generic", None)
        ev, _ = _build(ev, config, dict(build, training=False), policy_state=tm.policy_state_dict() or None)
        _append_outputs(ev, _aux_nodes(ev))
        meta = ev.meta
        ev = fx.GraphModule(ev, ev.graph)
        ev.meta = meta
        _share(ev, tm)
        tm.__dict__["_eval_graph"] = ev
    tm.train()
    return tm


def _aux_nodes(gm: fx.GraphModule) -> dict[str, Any]:
    """What the policy's losses read, as graph nodes: A-ViT's halting scores and ponder counts, and
    whatever a policy recorded with ``DecisionContext.aux`` (DynamicViT: each stage's keep mask)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    halting = gm.meta.get("tokenopt.halting", [])
    extra: dict[str, Any] = {"scores": [by_name[h["score"]] for h in halting], "rho": by_name[halting[-1]["rho"]]} if halting else {}
    for key, names in (gm.meta.get("tokenopt.aux") or {}).items():
        extra[key] = [by_name[n] for n in names]
    return extra
