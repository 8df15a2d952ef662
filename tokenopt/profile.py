"""Counting what a forward dispatches: ops per forward and host synchronisations.

``count_dispatch(fn, *inputs)`` runs ``fn`` under a ``TorchDispatchMode`` and counts

* **ops**: every operator call that reaches the dispatcher at the top level: ATen ops and
  ``tokenopt::`` custom ops, each counted once (a custom op is one launch of its fused kernel on a
  GPU; on CPU its reference runs inside it);
* **syncs**: reads of a tensor value back to the host, at any depth, inside custom ops too (their
  references are run under an inner mode that sees their ATen calls): ``item`` /
  ``_local_scalar_dense`` (``int(t)``, ``float(t)``, ``bool(t)``), ``nonzero``, ``masked_select``,
  ``unique``, boolean-mask indexing and ``repeat_interleave`` without ``output_size``. On a GPU each
  stalls the host until the device catches up. (``Tensor.tolist`` reads memory without dispatching;
  tokenopt's references never call it, which a test checks.)

Example:
    >>> import torch
    >>> from tokenopt.profile import count_dispatch
    >>> c = count_dispatch(lambda x: int((x + 1).sum()), torch.ones(3))
    >>> c.ops, c.syncs
    (3, 1)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCount", "count_dispatch"]

aten = torch.ops.aten
_SYNC_OPS = {
    aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
}


def _is_sync(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


@dataclass
class DispatchCount:
    """What one call dispatched: ``ops`` (top level), ``syncs`` (any depth), ``by_op`` / ``sync_ops``."""

    ops: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    sync_ops: Counter = field(default_factory=Counter)


class _Inner(TorchDispatchMode):
    def __init__(self, count: DispatchCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.count.syncs += 1
            self.count.sync_ops[str(func)] += 1
        return func(*args, **kwargs)


class _Counter(_Inner):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count.ops += 1
        self.count.by_op[str(func)] += 1
        if _is_sync(func, args, kwargs):
            self.count.syncs += 1
            self.count.sync_ops[str(func)] += 1
        if func.namespace == "tokenopt":
            from tokenopt.kernels.ops import REFERENCES

            name = func.__name__.split(".")[0]
            if name in REFERENCES:  # run the reference where the inner mode sees its ATen calls
                py = torch._C.DispatchKey.Python
                with torch._C._IncludeDispatchKeyGuard(py), \
                        torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.PythonTLSSnapshot), \
                        _Inner(self.count):
                    return REFERENCES[name](*args, **kwargs)
        return func(*args, **kwargs)


def count_dispatch(fn: Callable, *inputs: Any) -> DispatchCount:
    """Run ``fn(*inputs)`` once without autograd and count its ops and host syncs (module docstring)."""
    count = DispatchCount()
    with torch.no_grad(), _Counter(count):
        fn(*inputs)
    return count
