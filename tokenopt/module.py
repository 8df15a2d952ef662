"""What :func:`tokenopt.optimize` returns: a ``torch.fx.GraphModule`` that behaves like the model it replaces.

:class:`OptimizedModule` is the rewritten graph plus what a deployment script expects of a model:

- the ``nn.Module`` methods (``eval``, ``train``, ``to``, ``half``, ``requires_grad_``, ``state_dict``),
  on weights of its own: the user's model is never changed through it (``share_weights=True`` opts
  into sharing, to save memory);
- the original's call convention: inputs by position or by keyword (Hugging Face models are called
  ``model(pixel_values=x)``), and the attributes runners read (Hugging Face ``config``, ``dtype``,
  ``device``, ``can_generate``; timm ``pretrained_cfg``, ``num_classes``, ...);
- a batch-size rule (``min_batch``): below it the original, unreduced graph runs (same weights), since
  at small batches the reduction's bookkeeping costs more than the tokens it saves.

The graph, ``gm.graph`` and ``gm.meta`` are those of the pipeline; passes and inspection work on it
as on any GraphModule. ``forward`` is the reduced graph alone (what ``torch.compile`` and ONNX export
see); ``gm(...)`` adds the keyword binding and the batch-size rule.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx

__all__ = ["OptimizedModule", "carried_attributes"]

_BUILD_LOCK = threading.RLock()

# attributes a runner reads from a model, carried over when the model has them
_CARRIED = (
    "config", "generation_config", "main_input_name", "name_or_path", "base_model_prefix",  # transformers
    "pretrained_cfg", "default_cfg", "num_classes", "num_features", "embed_dim", "global_pool",  # timm
    "num_prefix_tokens", "patch_size", "img_size", "dynamic_img_size",
)


def carried_attributes(model: torch.nn.Module) -> dict[str, Any]:
    """The plain attributes of ``model`` that runners read (tensors and modules excluded)."""
    out = {}
    for name in _CARRIED:
        try:
            value = getattr(model, name)
        except Exception:  # a property that fails on this model: nothing to carry
            continue
        if isinstance(value, (torch.Tensor, torch.nn.Module)) or callable(value) and not isinstance(value, type):
            continue
        out[name] = value
    return out


def policy_weights(state: dict) -> dict:
    """The entries of an optimized or training module's state dict that are the learned policy's own
    weights (``tokenopt_<policy>.*``; the knobs, ``tokenopt_knob_*``, left out)."""
    return {k: v for k, v in state.items() if k.startswith("tokenopt_") and not k.startswith("tokenopt_knob_")}


def _own_weights(*gms: fx.GraphModule) -> None:
    """Give the graphs copies of every parameter, buffer and tensor constant they hold, shared among them.

    Tied tensors stay tied (one copy per original tensor), ``requires_grad`` is kept.
    """
    memo: dict[int, torch.Tensor] = {}

    def copy(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            data = t.detach().clone()
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else data
        return memo[id(t)]

    for gm in gms:
        for mod in gm.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = copy(p)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = copy(b)
            for name, v in list(vars(mod).items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    setattr(mod, name, copy(v))


class OptimizedModule(fx.GraphModule):
    """A rewritten graph that stands in for the model it came from (see the module docstring).

    Attributes:
        min_batch: batches smaller than this run the unreduced graph (``None``: always reduced).
        original_graph: the captured, unreduced graph (same weights), or None when it was not kept.
    """

    @classmethod
    def wrap(cls, gm: fx.GraphModule, *, signature: Optional[dict] = None, carried: Optional[dict] = None,
             original: Optional[fx.GraphModule] = None, min_batch: Optional[int] = None,
             own_weights: bool = True, class_name: Optional[str] = None,
             generic: Optional[fx.GraphModule] = None) -> "OptimizedModule":
        """Make the OptimizedModule for ``gm`` (its graph and meta are taken over, not copied).

        ``original``: the unreduced graph for the batch-size rule; ``generic``: the captured graph with
        free image sizes, specialised and reduced again for each new size (see :meth:`for_size`).
        """
        if original is not None:
            original = fx.GraphModule(original, original.graph)  # a plain GraphModule (export's refuses eval())
        if generic is not None:
            generic = fx.GraphModule(generic, generic.graph)
        # named as the model it stands in for (runners such as transformers' pipeline check class names)
        out = cls(gm, gm.graph, class_name=class_name or gm.meta.get("tokenopt.source", "GraphModule"))
        out.meta = gm.meta
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(gm, attr):
                setattr(out, attr, getattr(gm, attr))
        if own_weights:
            _own_weights(out)
        for other in (original, generic):  # one set of weights: the reduced graph's
            if other is not None:
                _share(other, out)
        # not submodules: their weights are the graph's own
        object.__setattr__(out, "_original", original)
        object.__setattr__(out, "_generic", generic)
        object.__setattr__(out, "_variants", {})
        out.__dict__["_tokenopt_signature"] = signature or {}
        out.__dict__["_tokenopt_carried"] = dict(carried or {})
        out.__dict__["min_batch"] = min_batch
        out.eval()
        return out

    # -- what runners read ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            knobs = (self.__dict__.get("meta") or {}).get("tokenopt.knobs") or {}
            if name in knobs:
                return float(self.get_buffer(knobs[name]))
            carried = self.__dict__.get("_tokenopt_carried", {})
            if name in carried:
                return carried[name]
            raise

    # -- run-time knobs and learned policies' weights ----------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        knobs = (self.__dict__.get("meta") or {}).get("tokenopt.knobs") or {}
        if name in knobs:
            self.set_knob(name, value)
        else:
            super().__setattr__(name, value)

    @property
    def knobs(self) -> dict[str, float]:
        """The graph's run-time knobs and their values (SaiT: ``density``); set one as an attribute."""
        return {name: float(self.get_buffer(attr)) for name, attr in (self.meta.get("tokenopt.knobs") or {}).items()}

    def set_knob(self, name: str, value: float) -> None:
        """Set run-time knob ``name`` (``gm.density = 0.8`` does the same); no rebuild."""
        knobs = self.meta.get("tokenopt.knobs") or {}
        if name not in knobs:
            raise AttributeError(f"this graph has no knob {name!r}; its knobs: {', '.join(knobs) or 'none'}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{name} must be a number in (0, 1] (a share; 1.0 = dense); got {value!r}")
        with torch.no_grad():
            for g in (self, *self.__dict__.get("_variants", {}).values()):
                g.get_buffer(knobs[name]).fill_(float(value))

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the learned policy's own modules (``tokenopt_<policy>.*``), for ``optimize(...,
        policy_state=...)``; empty for policies without any."""
        return policy_weights(self.state_dict())

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's own weights (the policy's modules and knobs left out): loads into the original
        architecture with ``strict=True``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("tokenopt_")}

    @property
    def original_graph(self) -> Optional[fx.GraphModule]:
        return self.__dict__.get("_original")

    @property
    def device(self) -> torch.device:
        t = next(iter(self.parameters()), None)
        return t.device if t is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        t = next((p for p in self.parameters() if p.is_floating_point()), None)
        return t.dtype if t is not None else torch.float32

    def can_generate(self) -> bool:  # transformers asks every model
        return False

    # -- calling ---------------------------------------------------------------------------------------
    def bind_inputs(self, args: tuple, kwargs: dict) -> tuple:
        """The positional inputs of the captured call, from the original's positional and keyword inputs."""
        sig = self.__dict__.get("_tokenopt_signature") or {}
        names: list[str] = list(sig.get("names", ()))
        captured: int = sig.get("captured", len(args))
        defaults: dict = sig.get("defaults", {})
        for name, value in kwargs.items():
            if name not in names:
                raise TypeError(f"{self.__class__.__name__}: unexpected keyword {name!r}; the model takes "
                                f"{', '.join(names) or 'positional inputs only'}")
            i = names.index(name)
            if i < len(args):
                raise TypeError(f"{self.__class__.__name__}: got input {name!r} by position and by keyword")
            if i >= captured and value is not None and not (name in defaults and _same(value, defaults[name])):
                raise TypeError(
                    f"{self.__class__.__name__}: {name}={value!r} was not part of the captured call (inputs "
                    f"{names[:captured]}, the rest at their defaults); optimize the model with "
                    f"example_inputs that include it")
        bound = list(args)
        for i, name in enumerate(names[len(args):], start=len(args)):
            if name in kwargs:
                if i >= captured:
                    break
                bound.append(kwargs[name])
            elif i < captured:
                raise TypeError(f"{self.__class__.__name__}: missing input {name!r} (the model was captured "
                                f"with inputs {names[:captured]})")
        if len(bound) > captured:
            raise TypeError(f"{self.__class__.__name__}: takes {captured} input(s) ({names[:captured]}), "
                            f"got {len(bound)}")
        return tuple(bound)

    def check_inputs(self, args: tuple) -> None:
        """Clear errors for inputs the graph was not built for (rank, image size, dtype, device)."""
        examples = self.meta.get("tokenopt.example_inputs") or ()
        name = self.__class__.__name__
        for i, (x, ex) in enumerate(zip(args, examples)):
            if not isinstance(ex, torch.Tensor):
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: input {i} must be a tensor like {tuple(ex.shape[1:])} per image; got "
                                f"{type(x).__name__}")
            want = tuple(ex.shape[1:])
            static = self.meta.get("tokenopt.static_batch")
            if static is not None and x.dim() == ex.dim() and x.shape[0] != static:
                raise ValueError(
                    f"{name}: input {i} is a batch of {x.shape[0]}, but this graph runs on batches of exactly "
                    f"{static}: torch.export fixed the batch size when capturing the model (its forward reads "
                    f"it as a Python number, most often len(x); x.shape[0] stays symbolic). Fix: write "
                    f"x.shape[0] in the model's forward and optimize it again, or pass batches of {static}")
            if x.dim() != ex.dim():
                hint = " (one image? add the batch dimension: x.unsqueeze(0))" if x.dim() == ex.dim() - 1 else ""
                raise ValueError(f"{name}: input {i} must be a {ex.dim()}-D batch [batch, {', '.join(map(str, want))}]; "
                                 f"got shape {tuple(x.shape)}{hint}")
            if tuple(x.shape[1:]) != want:
                raise ValueError(
                    f"{name}: input {i} has shape {tuple(x.shape)}, but this graph was built for "
                    f"[batch, {', '.join(map(str, want))}] (token counts are fixed per input size); resize the "
                    f"input, or optimize the model again with example_inputs of the size you need")
            dtype = self.dtype if ex.is_floating_point() else ex.dtype
            if x.dtype != dtype:
                raise TypeError(f"{name}: input {i} is {x.dtype}, the model runs in {dtype}; convert it "
                                f"(x.to({dtype})) or the model (gm.to(dtype))")
            if x.device != self.device:
                raise ValueError(f"{name}: input {i} is on {x.device}, the model on {self.device}; move one of "
                                 f"them (x.to(gm.device))")

    def for_size(self, args: tuple) -> Optional["OptimizedModule"]:
        """The graph for these inputs' image size when it differs from the example's (built on first use
        from the size-generic capture, reduced by the same policy, on this module's weights), else None."""
        generic = self.__dict__.get("_generic")
        examples = self.meta.get("tokenopt.example_inputs") or ()
        if generic is None or not args or not examples or not isinstance(args[0], torch.Tensor):
            return None
        x, ex = args[0], examples[0]
        if x.dim() != 4 or ex.dim() != 4 or x.shape[1:] == ex.shape[1:] or x.shape[1] != ex.shape[1]:
            return None
        key = tuple(x.shape[2:])
        variants = self.__dict__["_variants"]
        if key in variants:
            return variants[key]
        # torch.export keeps process-wide state (its mode stack): one build at a time, whichever thread asks
        # first; the others wait for it and take its graph
        with _BUILD_LOCK:
            if key not in variants:
                variants[key] = self._build_for_size(x, examples)
        return variants[key]

    def _build_for_size(self, x: torch.Tensor, examples: tuple) -> "OptimizedModule":
        generic = self.__dict__["_generic"]
        ex = examples[0]
        from tokenopt.api import _build
        from tokenopt.capture import capture

        sample = (torch.randn(2, *x.shape[1:], dtype=ex.dtype, device=self.device), *examples[1:])
        captured = capture(generic, sample, dynamic_size=False)
        captured.meta.pop("tokenopt.generic", None)
        gm, original = _build(captured, self.meta["tokenopt.policy"], self.meta["tokenopt.build"],
                              policy_state=self.policy_state_dict() or None)
        variant = OptimizedModule.wrap(gm, signature=self.__dict__.get("_tokenopt_signature"),
                                       carried=self.__dict__.get("_tokenopt_carried"), original=original,
                                       own_weights=False, class_name=self.__class__.__name__)
        for g in (variant, original):
            if g is not None:
                _share(g, self)
        variant.min_batch = self.__dict__.get("min_batch")
        variant.train(self.training)
        return variant

    @property
    def variants(self) -> dict:
        """The graphs built so far for other image sizes, by ``(height, width)``."""
        return dict(self.__dict__.get("_variants", {}))

    def __call__(self, *args, **kwargs):
        if kwargs:
            args = self.bind_inputs(args, kwargs)
        if not _traced(args):
            variant = self.for_size(args)
            if variant is not None:
                return variant(*args)
            self.check_inputs(args)
        min_batch = self.__dict__.get("min_batch")
        original = self.__dict__.get("_original")
        if min_batch is not None and original is not None and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() > 0 and args[0].shape[0] < min_batch:
            return original(*args)
        return super().__call__(*args)

    def _apply(self, fn, recurse=True):  # the other graphs' buffers and constants follow the module's
        super()._apply(fn, recurse)
        others = [self.__dict__.get("_original"), self.__dict__.get("_generic"),
                  *self.__dict__.get("_variants", {}).values()]
        for other in others:
            if other is not None:
                other._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        if mode and not self.training and not (self.meta.get("tokenopt.build") or {}).get("training"):
            warnings.warn(
                "this optimized graph was captured from the model in eval mode: switching it to train mode changes "
                "nothing it computes (dropout and stochastic depth are not in the graph, normalisation keeps its "
                "running statistics). To train, use tokenopt.prepare_training(model, policy=...), which captures "
                "the model in train mode.", stacklevel=2)
        super().train(mode)
        for variant in self.__dict__.get("_variants", {}).values():
            variant.train(mode)
        return self

    def __deepcopy__(self, memo):
        import copy

        meta, original, generic = self.meta, self.__dict__.get("_original"), self.__dict__.get("_generic")
        self.meta = {}  # (facts hold graph nodes with fake tensors: remapped below, not copied)
        try:
            gm = fx.GraphModule.__deepcopy__(self, memo)
        finally:
            self.meta = meta
        by_name = {n.name: n for n in gm.graph.nodes}
        gm.meta = {k: _remap_nodes(v, by_name) if _holds_nodes(v) else copy.deepcopy(v, memo) for k, v in meta.items()}
        for key in ("_tokenopt_signature", "_tokenopt_carried", "min_batch"):
            gm.__dict__[key] = copy.deepcopy(self.__dict__.get(key), memo)
        object.__setattr__(gm, "_original", copy.deepcopy(original, memo) if original is not None else None)
        object.__setattr__(gm, "_generic", copy.deepcopy(generic, memo) if generic is not None else None)
        object.__setattr__(gm, "_variants", {})
        for other in (gm.__dict__["_original"], gm.__dict__["_generic"]):
            if other is not None:
                _share(other, gm)
        return gm

    def __reduce__(self):
        # torch.save(gm) and pickle hold tokenopt's own archive (torch.export's format, content-hashed), never
        # the graph's Python objects; torch.load(path, weights_only=False) or pickle.loads rebuild it
        from tokenopt.saving import archive_bytes, load_bytes

        return load_bytes, (archive_bytes(self),)


def _share(original: fx.GraphModule, reduced: fx.GraphModule) -> None:
    """Point the unreduced graph at the reduced graph's tensors of the same names."""
    own = dict(reduced.named_parameters(remove_duplicate=False))
    own.update(reduced.named_buffers(remove_duplicate=False))
    for name, _ in list(original.named_parameters(remove_duplicate=False)) + list(
            original.named_buffers(remove_duplicate=False)):
        if name in own:
            owner, _, leaf = name.rpartition(".")
            mod = original.get_submodule(owner) if owner else original
            if leaf in mod._parameters:
                mod._parameters[leaf] = own[name]
            else:
                mod._buffers[leaf] = own[name]


def _traced(args: tuple) -> bool:
    """Whether this call is being traced (``torch.compile``, ``torch.export``) rather than run. The global
    ``torch.compiler.is_compiling()`` alone would also say so while *another* thread exports (a variant being
    built for a new image size), so outside dynamo the inputs decide: fake tensors in this thread's tracing."""
    if torch.compiler.is_dynamo_compiling():
        return True
    if not torch.compiler.is_compiling():
        return False
    from torch._guards import detect_fake_mode

    return detect_fake_mode(tuple(a for a in args if isinstance(a, torch.Tensor))) is not None


def _holds_nodes(v: Any, depth: int = 0) -> bool:
    if isinstance(v, fx.Node):
        return True
    if depth > 6:
        return False
    if isinstance(v, dict):
        return any(_holds_nodes(x, depth + 1) for x in (*v.keys(), *v.values()))
    if isinstance(v, (list, tuple)):
        return any(_holds_nodes(x, depth + 1) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return any(_holds_nodes(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v))
    return False


def _remap_nodes(v: Any, by_name: dict[str, fx.Node]) -> Any:
    """``v`` with every graph node replaced by the node of the same name in another graph (a fact about a node a
    later pass removed becomes None, as in a saved archive)."""
    if isinstance(v, fx.Node):
        return None if getattr(v, "_erased", False) else by_name.get(v.name)
    if isinstance(v, dict):
        return {_remap_nodes(k, by_name): _remap_nodes(x, by_name) for k, x in v.items()}
    if isinstance(v, (list, tuple)) and not hasattr(v, "_fields"):
        return type(v)(_remap_nodes(x, by_name) for x in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type) and _holds_nodes(v):
        return dataclasses.replace(v, **{f.name: _remap_nodes(getattr(v, f.name), by_name)
                                         for f in dataclasses.fields(v) if f.init})
    return v


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


def signature_of(model: torch.nn.Module, captured: int) -> dict:
    """Input names and simple defaults of ``model.forward``, for keyword calls."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {"names": [], "captured": captured, "defaults": {}}
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = {p.name: p.default for p in params
                if p.default is not p.empty and (p.default is None or isinstance(p.default, (bool, int, float, str)))}
    return {"names": names, "captured": captured, "defaults": defaults}


AUTO_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # the sizes min_batch="auto" measures


def measure_min_batch(gm: OptimizedModule, examples: tuple, batches: Optional[tuple] = None,
                      rounds: int = 3) -> int:
    """The smallest batch from which the reduced graph is faster than the unreduced one on this machine.

    Times both graphs (same weights, same inputs: the example's first image repeated) at each batch size,
    medians of ``rounds`` interleaved runs, and stops once the reduced graph has won at two sizes in a
    row. Returns the smallest measured size from which it won at every size measured after it; one past
    the largest size when it never won (the reduced graph then runs only for larger batches). The
    figures are kept in ``gm.meta["tokenopt.min_batch_timings"]``.
    """
    import statistics
    import time

    batches = tuple(batches or AUTO_BATCHES)
    original = gm.original_graph
    if original is None:
        raise ValueError("min_batch needs the unreduced graph: optimize(..., min_batch='auto')")
    x0 = examples[0]
    if not isinstance(x0, torch.Tensor) or x0.dim() == 0:
        raise ValueError("min_batch='auto' needs a batched tensor as the first input")
    timings, wins = {}, []
    with torch.no_grad():
        for b in batches:
            x = x0[:1].expand(b, *x0.shape[1:]).contiguous()
            inputs = (x, *examples[1:])
            fns = {"original": original, "reduced": fx.GraphModule.__call__.__get__(gm)}
            for f in fns.values():
                f(*inputs)  # warm-up
            times = {k: [] for k in fns}
            for r in range(rounds):
                for name in (("original", "reduced") if r % 2 == 0 else ("reduced", "original")):
                    if x.is_cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fns[name](*inputs)
                    if x.is_cuda:
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            gain = statistics.median(times["original"]) / statistics.median(times["reduced"])
            timings[b] = gain
            wins.append((b, gain > 1.0))
            if len(wins) >= 2 and wins[-1][1] and wins[-2][1]:
                break
    threshold = batches[-1] + 1 if not wins[-1][1] else wins[-1][0]
    for b, won in reversed(wins):
        if not won:
            break
        threshold = b
    gm.meta["tokenopt.min_batch_timings"] = timings
    return threshold
