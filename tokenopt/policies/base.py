"""Policy configs: frozen dataclasses, registered by a string alias, each naming the passes it runs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Union

import torch.fx as fx

__all__ = ["PolicyConfig", "register_policy", "make_config", "available_policies"]

_POLICIES: dict[str, type["PolicyConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. Subclasses are frozen dataclasses that validate in ``__post_init__``.

    ``passes()`` returns the rewrite passes the policy runs, in order, after ``find_blocks``.
    """

    name: ClassVar[str] = "base"
    version: ClassVar[int] = 1

    def passes(self) -> list[Callable[[fx.GraphModule], Any]]:
        raise NotImplementedError


def register_policy(cls: type[PolicyConfig]) -> type[PolicyConfig]:
    _POLICIES[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_POLICIES)


def make_config(policy: Union[str, PolicyConfig], **options: Any) -> PolicyConfig:
    """Turn ``policy`` (an alias or a config instance) plus keyword options into a config.

    Raises:
        ValueError: unknown alias, or options given alongside a config instance.
        TypeError: an option the policy does not have.
    """
    if isinstance(policy, PolicyConfig):
        if options:
            return dataclasses.replace(policy, **options)
        return policy
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
