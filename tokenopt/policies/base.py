"""Policy configs: frozen dataclasses registered by a string alias. A policy *decides*; it never realises.

A policy config says where it acts (``blocks``, ``site``) and how it decides (:meth:`PolicyConfig.decide`:
graph nodes in, a :class:`~tokenopt.ir.Keep` / :class:`~tokenopt.ir.Merge` out). Its pass,
:class:`PlanDecisions`, only writes the plan; :mod:`tokenopt.passes.realize` executes every policy's
decisions in the execution form the user picked (padded, masked or packed). Several policies run in
one graph by listing them (:class:`Composite`): each decides on the tokens the previous ones left.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from tokenopt.ir import META_PLAN, SITES, PlannedDecision
from tokenopt.passes.find_blocks import get_model_info
from tokenopt.passes.realize import RewriteError

__all__ = ["PolicyConfig", "Composite", "PlanDecisions", "register_policy", "make_config", "available_policies"]

_POLICIES: dict[str, type["PolicyConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses are frozen dataclasses that validate in ``__post_init__``.

    Class attributes a policy sets: ``name`` (its alias), ``site`` (``"attn"``: inside attention, only
    the kept tokens go on as queries; ``"post_attn"``: after the attention residual), ``adaptive``
    (counts vary per image, so it can run packed). It implements :meth:`decide` and, if it acts on
    some blocks only, :meth:`default_blocks`. A ``blocks`` field, when present, overrides the default.
    """

    name: ClassVar[str] = "base"
    version: ClassVar[int] = 1
    site: ClassVar[str] = "post_attn"
    adaptive: ClassVar[bool] = False
    #: the training graph decides in another form than inference (DynamicViT: Gumbel masks, then top-k);
    #: ``prepare_training`` then builds the inference decisions too, for ``eval()``
    decides_differently_in_training: ClassVar[bool] = False

    def default_blocks(self, depth: int) -> Sequence[int]:
        return range(depth)

    def decide(self, ctx) -> Any:
        """Insert the decision nodes for ``ctx.block`` through ``ctx.call`` and return a Keep, a Merge or None."""
        raise NotImplementedError

    def plan(self, depth: int, blocks: Sequence[int]) -> list[tuple[int, str, Callable]]:
        """``(block, site, decide)`` for every decision this policy makes on a model of ``depth`` blocks,
        given its chosen ``blocks`` (0-based): by default :meth:`decide` at :attr:`site` of each. A policy
        that decides at several sites (AdaViT: gates before a block, tokens after one) overrides it."""
        return [(b, self.site, self.decide) for b in sorted(set(blocks))]

    def default_mode(self) -> Optional[str]:
        """The execution form this config asks for, if any (``optimize(mode=...)`` overrides it)."""
        return None

    def policies(self) -> tuple["PolicyConfig", ...]:
        return (self,)

    def training_losses(self, aux: dict) -> dict:
        """The policy's auxiliary training losses (weighted) from what its training graph returned beside
        the model's output (:mod:`tokenopt.training`); none by default."""
        return {}

    def training_stats(self, aux: dict) -> dict:
        """What the training graph's decisions used, from the same values (e.g. DynamicViT: the share of
        patches each stage kept), for the training log beside the losses; not a loss. None by default."""
        return {}

    def passes(self) -> list[Callable[[fx.GraphModule], Any]]:
        from tokenopt.passes.canonicalize import canonicalize_attention

        return [canonicalize_attention, *(PlanDecisions(p) for p in self.policies())]


@dataclasses.dataclass(frozen=True)
class Composite(PolicyConfig):
    """Several policies in one graph, in order: ``Composite((TopK(blocks=(3,)), ToMe(r=8)))``.

    ``optimize(model, policy=[...])`` builds one. At a block where two act at the same site, the later
    one decides on the tokens the earlier one left.
    """

    parts: tuple = ()
    name = "composite"

    def __post_init__(self):
        parts = tuple(make_config(p) for p in self.parts)
        if not parts:
            raise ValueError("a composite policy needs at least one policy, e.g. policy=['topk', 'tome']")
        flat = tuple(q for p in parts for q in p.policies())
        object.__setattr__(self, "parts", flat)

    def policies(self):
        return self.parts

    def training_losses(self, aux: dict) -> dict:
        return {k: v for part in self.parts for k, v in part.training_losses(aux).items()}

    def training_stats(self, aux: dict) -> dict:
        return {k: v for part in self.parts for k, v in part.training_stats(aux).items()}

    def default_mode(self):
        modes = {p.default_mode() for p in self.parts} - {None}
        if len(modes) > 1:
            raise ValueError(f"the policies ask for different execution modes ({', '.join(sorted(modes))}); "
                             "pass one with optimize(..., mode=...)")
        return modes.pop() if modes else None

    def __repr__(self):
        return " + ".join(repr(p) for p in self.parts)


@dataclasses.dataclass
class PlanDecisions:
    """The decision pass of one policy: adds ``PlannedDecision`` entries to ``gm.meta[META_PLAN]``."""

    config: PolicyConfig
    requires = ("model_info",)
    ensures = ("plan",)

    @property
    def pass_name(self) -> str:
        return f"plan_{self.config.name}"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        info = get_model_info(gm)
        n = len(info.blocks)
        cfg = self.config
        chosen = getattr(cfg, "blocks", None)
        given = list(cfg.default_blocks(n)) if chosen is None else list(chosen)
        bad = [b for b in given if not -n <= b < n]  # (as the user wrote them: -1 is the last block)
        if bad:
            raise RewriteError(f"{cfg.name}: blocks {bad} do not exist; the model has blocks 0..{n - 1} "
                               f"(or -{n}..-1 counted from the end)")
        chosen = [b if b >= 0 else n + b for b in given]
        plan = gm.meta.setdefault(META_PLAN, [])
        for b, site, decide in cfg.plan(n, chosen):
            if site not in SITES:
                raise RewriteError(f"{cfg.name}: site must be one of {SITES}; got {site!r}")
            if not 0 <= b < n:
                raise RewriteError(f"{cfg.name}: block {b} does not exist; the model has blocks 0..{n - 1}")
            plan.append(PlannedDecision(b, site, cfg.name, functools.partial(decide), cfg.adaptive))
        return PassResult(gm, False)


def register_policy(cls: type[PolicyConfig]) -> type[PolicyConfig]:
    _POLICIES[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def make_config(policy: Union[str, PolicyConfig, Sequence], **options: Any) -> PolicyConfig:
    """Turn ``policy`` (an alias, a config instance, or a list of them) plus keyword options into a config.

    Raises:
        ValueError: unknown alias, or options given alongside a list.
        TypeError: an option the policy does not have.
    """
    if isinstance(policy, (list, tuple)):
        if options:
            raise ValueError("options cannot be given with a list of policies; pass configs instead, "
                             "e.g. policy=[tokenopt.TopK(keep_rate=0.7, blocks=(3,)), tokenopt.ToMe(r=8)]")
        return Composite(tuple(policy))
    if isinstance(policy, PolicyConfig):
        if options:
            return dataclasses.replace(policy, **options)
        return policy
    if isinstance(policy, str) and policy.endswith(".json") and policy not in _POLICIES:
        import os

        if not os.path.exists(policy):
            raise ValueError(f"policy {policy!r} looks like a calibration file, but there is no such file")
        from tokenopt.calibrate import load_config

        return make_config(load_config(policy), **options)
    if not isinstance(policy, str) or policy not in _POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(available_policies())} "
                         "or pass a config instance such as tokenopt.ATS(...)")
    cls = _POLICIES[policy]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"policy {policy!r} has no option {', '.join(sorted(unknown))}; "
                        f"its options are: {', '.join(sorted(fields)) or 'none'}")
    return cls(**options)


def require_cls(ctx, policy: str) -> None:
    """CLS-attention policies need a CLS token in front (token 0, read by the head)."""
    if ctx.num_prefix < 1:
        raise RewriteError(
            f"{policy} scores tokens by the CLS token's attention, but this model has no prefix token; "
            "use policy='tome', which needs none")
    if not ctx.has_cls:
        raise RewriteError(
            f"{policy} scores tokens by the CLS token's attention, but this model's {ctx.num_prefix} prefix "
            "token(s) are not read by its head (registers, not a CLS token): a register's attention would "
            "score the patches by another criterion. Use policy='tome', which needs no CLS token")
