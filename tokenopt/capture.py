"""Model -> ATen-level ``torch.fx.GraphModule`` with shape metadata on every node.

Why ``torch.export`` and not ``torch.fx.symbolic_trace``: export works on every model family tokenopt
targets (timm, Hugging Face transformers 5.x, einops-based and hand-written ViTs), while
symbolic_trace fails on transformers 5.x and on einops. Export also lowers every model to one op
vocabulary (``aten.linear``, ``aten.layer_norm``, ``aten.scaled_dot_product_attention``,
``aten.softmax``, ...), so block patterns are written once instead of once per module library, and it
records a FakeTensor (``node.meta["val"]``) with a symbolic batch size on each node.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["CaptureError", "StaticBatchWarning", "SizeGenericWarning", "capture", "default_example_inputs",
           "SIZE_BUDGET_S"]

#: seconds the size-generic capture may take before the fixed-size capture is used instead
SIZE_BUDGET_S = 10.0


class CaptureError(RuntimeError):
    """The model could not be turned into a graph; the message names the module and what to try."""


class StaticBatchWarning(UserWarning):
    """``torch.export`` fixed the batch size: the model's forward reads it as a Python constant (most
    often ``len(x)`` on a tensor), so the captured graph runs on batches of exactly that size."""


class SizeGenericWarning(UserWarning):
    """The size-generic capture ran out of its time budget; the graph takes the example's image size only."""


class _OutOfTime(BaseException):  # (not an Exception: export's own handlers must not swallow it)
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise :class:`_OutOfTime` in this block after ``seconds`` (a SIGALRM timer: in the main thread of a
    process that has signals; elsewhere the block runs unbounded)."""
    import signal
    import threading

    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _OutOfTime()

    import time

    previous = signal.signal(signal.SIGALRM, expire)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_timer[0]:  # (someone else's timer was running: give it back what is left of it)
            signal.setitimer(signal.ITIMER_REAL, max(old_timer[0] - (time.monotonic() - start), 1e-3))


def default_example_inputs(model: torch.nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """A random image batch of the size the model was configured for.

    Reads the input size from the model's own configuration (timm's ``pretrained_cfg["input_size"]``
    or a Hugging Face ``config.image_size`` / ``config.num_channels``). Batch 2 by default so that
    export keeps the batch dimension symbolic (it specialises sizes 0 and 1).

    Raises:
        CaptureError: when the model states no input size; pass ``example_inputs`` then.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        c, h, w = cfg["input_size"]
        # timm models built with a non-default img_size keep the default in pretrained_cfg.
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None)
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
            h, w = img_size
        c = getattr(getattr(patch_embed, "proj", None), "in_channels", c)  # (and a non-default in_chans)
        return (torch.randn(batch, c, h, w, device=device, dtype=dtype),)
    hf_cfg = getattr(model, "config", None)
    if hf_cfg is not None and hasattr(hf_cfg, "image_size"):
        size = hf_cfg.image_size
        h, w = (size, size) if isinstance(size, int) else size
        c = getattr(hf_cfg, "num_channels", 3)
        return (torch.randn(batch, c, h, w, device=device, dtype=dtype),)
    raise CaptureError(
        f"{type(model).__name__} does not say which input size it takes; pass example_inputs, "
        f"e.g. tokenopt.capture(model, example_inputs=(torch.randn(2, 3, 224, 224),))"
    )


class _ModuleTracker:
    """Keeps the stack of modules running during export, to name the one where capture failed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.deepest: list[str] = []
        self._handles = []
        for name, mod in model.named_modules():
            self._handles.append(mod.register_forward_pre_hook(self._enter(name or "<root>", mod)))
            self._handles.append(mod.register_forward_hook(self._leave()))

    def _enter(self, name: str, mod: torch.nn.Module):
        label = f"{name} ({type(mod).__name__})"

        def hook(*_):
            self.stack.append(label)
            self.deepest = list(self.stack)

        return hook

    def _leave(self):
        def hook(*_):
            if self.stack:
                self.stack.pop()

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module, train: bool = False):
    """Export in eval mode (dropout off, drop-path off), or in training mode, and give the model back as
    it came."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, was_training in modes.items():
            m.train(was_training)


def capture(
    model: torch.nn.Module,
    example_inputs: Optional[Sequence[Any]] = None,
    *,
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    train: bool = False,
    size_budget_s: float = SIZE_BUDGET_S,
) -> fx.GraphModule:
    """Capture ``model`` as an ATen-level ``torch.fx.GraphModule``.

    The model is exported in eval mode (its own train/eval flags are restored afterwards) with the
    batch dimension of every tensor input left symbolic, so the graph runs at any batch size.

    Args:
        model: the vision transformer (any ``nn.Module`` that ``torch.export`` accepts).
        example_inputs: positional inputs for one call; a random image batch of the model's
            configured size when omitted (see :func:`default_example_inputs`).
        dynamic_batch: keep the batch dimension symbolic.
        dynamic_size: also try image sizes as symbols; when the model takes other sizes the size-generic
            graph is kept in ``gm.meta["tokenopt.generic"]`` (the returned graph has the example's size).
        train: capture the training form (dropout, stochastic depth and batch statistics as in
            training) instead of the inference form.
        size_budget_s: how long the size-generic attempt may take (in the main thread) before the model is
            captured at the example's size instead, with a :class:`SizeGenericWarning`: on some models
            (Hugging Face Swin, Hiera) torch.export spends minutes simplifying symbolic size expressions.

    Returns:
        A GraphModule taking the same inputs and returning the same output structure as ``model``.
        Every node carries ``meta["val"]`` (from export, symbolic batch) and ``meta["tensor_meta"]``
        (concrete shape and dtype on ``example_inputs``); ``gm.meta["tokenopt.example_inputs"]`` keeps
        the inputs.

    Raises:
        CaptureError: naming the module that was running when export failed and what to try.

    Example:
        >>> import timm, tokenopt
        >>> gm = tokenopt.capture(timm.create_model("deit_tiny_patch16_224", depth=2))
        >>> [n.meta["tensor_meta"].shape for n in gm.graph.nodes if n.op == "placeholder"]
        [torch.Size([2, 3, 224, 224])]
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"tokenopt.capture takes an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if isinstance(model, fx.GraphModule) and "tokenopt.example_inputs" in model.meta:
        raise CaptureError("this GraphModule was already produced by tokenopt; optimize the original model")
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):  # one tensor: the model's one input (not a tuple of its rows)
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        raise CaptureError("example_inputs are the model's positional inputs, as a tuple; got a dict. Pass "
                           "(x,) for model(x); keyword inputs: call gm(pixel_values=x) on the result")
    example_inputs = tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        # export specialises a dimension of size 1 to 1; a batch-1 example becomes the same image twice
        example_inputs = tuple(
            torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x
            for x in example_inputs)
        empty = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0]
        if empty:
            raise CaptureError(f"example input {empty[0]} is an empty batch; pass at least one image")
        dynamic_shapes = tuple(
            {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
            for x in example_inputs
        )

    tracker = _ModuleTracker(model)
    exported = generic = None
    out_of_time = False
    try:
        with _eval_mode(model, train), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamic_size and dynamic_shapes is not None and any(isinstance(x, torch.Tensor) and x.dim() == 4 for x in example_inputs):
                # image sizes left free too: a model that takes other sizes (timm dynamic_img_size, ...) keeps
                # them symbolic, one with fixed position tables specialises them; either way it captures
                sized = tuple(
                    {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
                    if isinstance(x, torch.Tensor) and x.dim() == 4 else d
                    for x, d in zip(example_inputs, dynamic_shapes))
                try:
                    with _time_limit(size_budget_s):
                        exported = torch.export.export(model, example_inputs, dynamic_shapes=sized)
                except _OutOfTime:
                    exported, out_of_time = None, True
                except Exception:
                    exported = None  # captured below with static image sizes, or fails there with the reason
            if exported is None:
                exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export raises many types; all become one clear error
        where = tracker.deepest[-1] if tracker.deepest else type(model).__name__
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mismatch = _input_mismatch(model, example_inputs)
        advice = (f"What to try: {mismatch}" if mismatch else
                  "What to try: remove data-dependent Python control flow from that module's forward "
                  "(branches on tensor values, .item(), .tolist()), or pass example_inputs that match "
                  "what the model expects.")
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: it failed inside module {where}: "
            f"{type(exc).__name__}: {first_line}\n{advice}"
        ) from exc
    finally:
        tracker.remove()
    if out_of_time:
        warnings.warn(SizeGenericWarning(
            f"{type(model).__name__}: capturing it for free image sizes took longer than {size_budget_s:g} s "
            "(torch.export simplifying the model's size arithmetic), so it is captured at the example's size, "
            f"{tuple(example_inputs[0].shape[2:])}, and other sizes are refused. To wait longer for a size-generic "
            "graph: tokenopt.capture(model, size_budget_s=...)."), stacklevel=2)

    if _has_free_image_size(exported):
        # the graph tokenopt rewrites has fixed token counts: specialise it to the example's size, and keep
        # the size-generic graph to specialise again for other sizes (OptimizedModule does, on first use)
        generic = exported.module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(generic, example_inputs, dynamic_shapes=dynamic_shapes)
    gm = exported.module()
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    gm.meta["tokenopt.example_inputs"] = example_inputs
    gm.meta["tokenopt.source"] = type(model).__name__
    if dynamic_batch:
        _note_static_batch(gm, type(model).__name__)
    gm.meta["tokenopt.generic"] = generic
    return gm


def release_fake_caches(*graphs: Optional[fx.GraphModule]) -> None:
    """Empty the fake-tensor dispatch caches of the shape environments behind these graphs' ``meta["val"]``.

    torch keeps every ShapeEnv an export made alive for the life of the process (``lru_cache`` on its methods
    holds ``self``), and with it that cache, which tokenopt's passes fill while they propagate shapes; emptied
    once a graph is built, repeated ``optimize`` calls grow the process by about what ``torch.export`` alone
    leaves behind (tests/test_memory.py). The cache only saves recomputing fake shapes."""
    seen = set()
    for gm in graphs:
        if gm is None:
            continue
        for n in gm.graph.nodes:
            val = n.meta.get("val")
            env = getattr(getattr(val, "fake_mode", None), "shape_env", None)
            if env is not None and id(env) not in seen:
                seen.add(id(env))
                cache = getattr(env, "fake_tensor_cache", None)
                if isinstance(cache, dict):
                    cache.clear()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile``'s wrapper, ``nn.DataParallel`` or ``DistributedDataParallel``: tokenopt
    captures the model's own forward (it compiles and parallelises the same way afterwards)."""
    while True:
        if type(model).__module__.startswith("torch._dynamo") and isinstance(getattr(model, "_orig_mod", None),
                                                                            torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            warnings.warn(f"optimizing the model inside {type(model).__name__}; wrap the result again for data "
                          "parallelism", stacklevel=4)
            model = model.module
        else:
            return model


def _input_mismatch(model: torch.nn.Module, example_inputs: tuple) -> Optional[str]:
    """What is wrong with the example's image, when it is not what the model is configured for."""
    try:
        expected = default_example_inputs(model)[0]
    except CaptureError:
        return None
    x = example_inputs[0] if example_inputs else None
    if not isinstance(x, torch.Tensor):
        return f"pass the image batch as the first example input, e.g. (torch.randn(2, {', '.join(map(str, expected.shape[1:]))}),)"
    if x.dim() != expected.dim() or x.shape[1:] != expected.shape[1:]:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        note = f" (its patch size is {tuple(patch)})" if isinstance(patch, (tuple, list)) else ""
        return (f"the example input is {list(x.shape)}, but the model is configured for images "
                f"{list(expected.shape[1:])}{note}: pass example_inputs of that size, or build the model for "
                "the size you need (timm: img_size=..., or dynamic_img_size=True)")
    if x.dtype != expected.dtype:
        return f"the example input is {x.dtype} but the model's weights are {expected.dtype}: convert one to the other"
    return None


def _note_static_batch(gm: fx.GraphModule, name: str) -> None:
    """Record (``gm.meta["tokenopt.static_batch"]``) and say when export fixed the image batch size."""
    images = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].dim() > 0]
    if not images or not is_concrete_int(images[0].meta["val"].shape[0]):
        return
    size = int(images[0].meta["val"].shape[0])
    gm.meta["tokenopt.static_batch"] = size
    warnings.warn(StaticBatchWarning(
        f"{name}: torch.export fixed the batch size at {size}: the model's forward reads it as a Python "
        f"number (most often len(x) on a tensor; x.shape[0] stays symbolic), so this graph runs on batches "
        f"of exactly {size}. Fix: write x.shape[0] for the batch size in the model's forward."), stacklevel=3)


def _has_free_image_size(exported: torch.export.ExportedProgram) -> bool:
    """Whether a 4-D user input kept a symbolic height or width."""
    names = {s.arg.name for s in exported.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT and hasattr(s.arg, "name")}
    for n in exported.graph.nodes:
        if n.op == "placeholder" and n.name in names:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 4 and not all(
                    is_concrete_int(d) for d in val.shape[2:]):
                return True
    return False
