"""Save and load optimized models: ``tokenopt.save(gm, path)`` / ``tokenopt.load(path)``.

The file is a ``torch.export`` PT2 archive (a zip): the reduced graph as an ``ExportedProgram`` (and
the unreduced one when a batch-size rule keeps it), weights as tensors, and one JSON file,
``tokenopt.json``, with the config, the model facts and what the passes recorded. Nothing is pickled:
the JSON codec below rebuilds only tokenopt's own dataclasses, graph nodes (by name) and a few plain
types, and Hugging Face configs from their dict. The ``tokenopt::`` ops are registered when tokenopt
is imported, so the archive loads in any process that imports it.

Writes are atomic: the archive goes to a temporary file next to ``path`` and replaces it only once
complete, so a failed save leaves an existing file as it was.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import operator
import os
import tempfile
import warnings
from typing import Any

import torch
import torch.fx as fx

__all__ = ["save", "load", "export_onnx", "LoadError", "FORMAT"]

FORMAT = 1  # bump when the JSON layout changes
_META_FILE = "tokenopt.json"
_NAME_KEY = "tokenopt_name"
_SKIP_META = {"tokenopt.example_inputs", "tokenopt.plan", "inline_constraints", "range_constraints", "shape_env"}


class LoadError(RuntimeError):
    """The file is not a tokenopt archive, or one this version cannot read; the message says which."""


# -- a JSON codec for gm.meta ---------------------------------------------------------------------------
def _encode(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, fx.Node):  # (a fact about a node a later pass removed is saved as None)
        return None if getattr(v, "_erased", False) else {"__node__": v.name}
    if isinstance(v, torch.SymInt) or isinstance(v, torch.SymFloat):
        raise TypeError("symbolic value")
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Tensor):
        return {"__tensor__": v.detach().cpu().tolist(), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, tuple):
        return {"__tuple__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, range):
        return {"__tuple__": list(v)}
    if isinstance(v, dict):
        return {"__dict__": [[_encode(k), _encode(x)] for k, x in v.items()]}
    cls = type(v)
    if dataclasses.is_dataclass(v) and cls.__module__.startswith("tokenopt."):
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}}
    if cls.__module__.startswith("transformers.") and hasattr(v, "to_dict"):
        return {"__hf_config__": f"{cls.__module__}:{cls.__qualname__}", "dict": _encode(v.to_dict())}
    raise TypeError(f"{cls.__name__} is not saved")


def _decode(v: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_decode(x, nodes) for x in v]
    if not isinstance(v, dict):
        return v
    if "__node__" in v:
        return nodes[v["__node__"]]
    if "__dtype__" in v:
        return getattr(torch, v["__dtype__"])
    if "__tensor__" in v:
        return torch.tensor(v["__tensor__"], dtype=getattr(torch, v["dtype"]))
    if "__tuple__" in v:
        return tuple(_decode(x, nodes) for x in v["__tuple__"])
    if "__dict__" in v:
        return {_decode(k, nodes): _decode(x, nodes) for k, x in v["__dict__"]}
    if "__dataclass__" in v:
        cls = _import(v["__dataclass__"], "tokenopt.")
        fields = {k: _decode(x, nodes) for k, x in v["fields"].items()}
        obj = cls.__new__(cls)  # (frozen configs validate in __post_init__; these were valid when saved)
        for k, x in fields.items():
            object.__setattr__(obj, k, x)
        for f in dataclasses.fields(cls):
            if f.name not in fields and f.default is not dataclasses.MISSING:
                object.__setattr__(obj, f.name, f.default)
        return obj
    if "__hf_config__" in v:
        return _import(v["__hf_config__"], "transformers.").from_dict(_decode(v["dict"], nodes))
    return {k: _decode(x, nodes) for k, x in v.items()}


def _import(path: str, prefix: str) -> type:
    module, _, name = path.partition(":")
    if not module.startswith(prefix):
        raise LoadError(f"the archive names a class outside {prefix[:-1]} ({path}); refusing to load it")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# -- node names across export -----------------------------------------------------------------------------
def _stamp_names(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem:  # (getitems: by producer and index)
            n.meta.setdefault("custom", {})[_NAME_KEY] = n.name


def _unstamp(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        custom = n.meta.get("custom")
        if custom and _NAME_KEY in custom:
            del custom[_NAME_KEY]
            if not custom:
                del n.meta["custom"]


def _node_map(saved: dict, gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Saved node name -> node of the loaded graph: call nodes by their stamp (export copies a node's
    stamp onto the checks it adds after it, so the target must match too), getitems by (producer,
    index), placeholders by position."""
    targets = saved.get("targets", {})
    stamped = {}
    for n in gm.graph.nodes:
        name = (n.meta.get("custom") or {}).get(_NAME_KEY)
        if name is not None and n.target is not operator.getitem and str(n.target) == targets.get(name):
            stamped.setdefault(name, n)
    out = dict(stamped)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for name, i in saved.get("placeholders", {}).items():
        if i < len(placeholders):
            out[name] = placeholders[i]
    for name, (parent, index) in saved.get("getitems", {}).items():
        p = stamped.get(parent)
        if p is None:
            continue
        for u in p.users:
            if u.target is operator.getitem and u.args[1] == index:
                out[name] = u
    return out


# -- save / load --------------------------------------------------------------------------------------------
def _export(gm: fx.GraphModule, examples: tuple, sizes: bool = False) -> torch.export.ExportedProgram:
    plain = fx.GraphModule(gm, gm.graph)
    auto = torch.export.Dim.AUTO
    dyn = tuple(({0: auto, 2: auto, 3: auto} if sizes and x.dim() == 4 else {0: auto})
                if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(plain, examples, dynamic_shapes=dyn)


def save(gm: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``gm`` (what :func:`tokenopt.optimize` returned) to ``path`` (conventionally ``.pt2``).

    Example:
        >>> import os, tempfile, torch, timm, tokenopt
        >>> gm = tokenopt.optimize(timm.create_model("deit_tiny_patch16_224", depth=2), policy="tome")
        >>> path = os.path.join(tempfile.mkdtemp(), "tome.pt2")
        >>> tokenopt.save(gm, path)
        >>> x = torch.randn(3, 3, 224, 224)
        >>> torch.equal(tokenopt.load(path)(x), gm(x))
        True
    """
    from tokenopt import __version__
    from tokenopt.module import OptimizedModule

    if not isinstance(gm, fx.GraphModule) or "tokenopt.policy" not in gm.meta:
        raise TypeError("tokenopt.save takes what tokenopt.optimize returned")
    examples = tuple(gm.meta["tokenopt.example_inputs"])
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise OSError(f"cannot write {path}: {directory} is not a writable directory")

    programs = {}
    _stamp_names(gm)
    try:
        programs["reduced"] = _export(gm, examples)
        original = gm.original_graph if isinstance(gm, OptimizedModule) else None
        if original is not None:
            programs["original"] = _export(original, examples)
        generic = gm.__dict__.get("_generic") if isinstance(gm, OptimizedModule) else None
        if generic is not None:
            programs["generic"] = _export(generic, examples, sizes=True)
    finally:
        _unstamp(gm)

    meta, dropped = {}, []
    for k, v in gm.meta.items():
        if k in _SKIP_META:
            continue
        try:
            meta[k] = _encode(v)
        except TypeError:
            dropped.append(k)
    placeholders = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    getitems = {n.name: (n.args[0].name, n.args[1]) for n in gm.graph.nodes
                if n.op == "call_function" and n.target is operator.getitem
                and isinstance(n.args[0], fx.Node)}
    carried, carried_dropped = {}, []
    for k, v in (gm.__dict__.get("_tokenopt_carried") or {}).items():
        try:
            carried[k] = _encode(v)
        except TypeError:
            carried_dropped.append(k)
    doc = {
        "format": FORMAT, "tokenopt": __version__, "torch": torch.__version__,
        "class_name": type(gm).__name__, "meta": meta, "dropped_meta": dropped,
        "placeholders": placeholders, "getitems": getitems,
        "targets": {n.name: str(n.target) for n in gm.graph.nodes if n.op == "call_function"},
        "signature": _encode(gm.__dict__.get("_tokenopt_signature") or {}),
        "carried": carried, "dropped_attributes": carried_dropped,
        "min_batch": gm.__dict__.get("min_batch"), "training": gm.training,
    }
    from torch.export.pt2_archive._package import package_pt2

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.pt2", dir=directory)
    os.close(fd)
    try:
        package_pt2(tmp, exported_programs=programs, extra_files={_META_FILE: json.dumps(doc)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike):
    """Read an optimized model written by :func:`save`; returns an :class:`~tokenopt.module.OptimizedModule`.

    Raises:
        LoadError: not a tokenopt archive, or written by an incompatible tokenopt or torch version.
    """
    import tokenopt.kernels.ops  # noqa: F401  (registers the tokenopt:: ops the graph calls)
    from tokenopt import __version__
    from tokenopt.module import OptimizedModule

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    from torch.export.pt2_archive._package import load_pt2

    try:
        import zipfile

        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/" + _META_FILE) or n == _META_FILE]
            if not names:
                raise LoadError(f"{path} is not a tokenopt archive (no {_META_FILE} inside); was it written by "
                                "tokenopt.save?")
            doc = json.loads(z.read(names[0]))
    except zipfile.BadZipFile as exc:
        raise LoadError(f"{path} is not a tokenopt archive (not a zip file): {exc}") from exc
    if doc.get("format") != FORMAT:
        raise LoadError(f"{path} was written by tokenopt {doc.get('tokenopt')} in archive format "
                        f"{doc.get('format')}; this tokenopt ({__version__}) reads format {FORMAT}: save it again "
                        "from the original model with this version")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            contents = load_pt2(path)
    except Exception as exc:
        raise LoadError(f"{path} could not be read by torch {torch.__version__} (written with torch "
                        f"{doc.get('torch')}, tokenopt {doc.get('tokenopt')}): {type(exc).__name__}: {exc}") from exc
    programs = contents.exported_programs
    reduced = programs["reduced"].module()
    nodes = _node_map(doc, reduced)
    meta = {}
    for k, v in doc["meta"].items():
        try:
            meta[k] = _decode(v, nodes)
        except KeyError:  # a fact naming a node this graph lost in export: left out, said in the warning
            doc["dropped_meta"].append(k)
    if doc["dropped_meta"]:
        warnings.warn(f"{path}: not restored: {', '.join(doc['dropped_meta'])}", stacklevel=2)
    # facts that name nodes (rather than hold them): the names of the loaded graph
    renamed = {old: n.name for old, n in nodes.items()}
    if "tokenopt.count_nodes" in meta:
        meta["tokenopt.count_nodes"] = {b: (kind, renamed.get(name, name))
                                        for b, (kind, name) in meta["tokenopt.count_nodes"].items()}
    for d in meta.get("tokenopt.decisions", []):
        for key in ("idx", "valid", "slot"):
            if d.get(key):
                d[key] = renamed.get(d[key], d[key])
    examples = tuple(programs["reduced"].example_inputs[0]) if programs["reduced"].example_inputs else ()
    meta["tokenopt.example_inputs"] = examples
    reduced.meta.update(meta)
    _unstamp(reduced)
    original, generic = (programs[k].module() if k in programs else None for k in ("original", "generic"))
    out = OptimizedModule.wrap(
        reduced, signature=_decode(doc["signature"], {}),
        carried={k: _decode(v, {}) for k, v in doc["carried"].items()},
        original=original, generic=generic, own_weights=False, class_name=doc.get("class_name"))
    out.min_batch = doc.get("min_batch")
    out.train(doc.get("training", False))
    return out


def export_onnx(gm: fx.GraphModule, path: str | os.PathLike, example_inputs=None, *, verify: bool = True,
                atol: float = 1e-4) -> str:
    """Write ``gm`` as an ONNX model with a dynamic batch dimension (``torch.onnx.export``, dynamo).

    Works for fixed-budget policies (none, top-k, ToMe) and their composites: every token op has an
    ONNX-expressible decomposition (ToMe's mean merge is an ``index_add`` and a division, not
    ``scatter_reduce(mean)``). Adaptive policies (ATS) are refused: their per-image counts need
    ``nonzero``-style data-dependent shapes or ops without decompositions.

    Args:
        example_inputs: one call's inputs (default: those ``optimize`` used).
        verify: run the file in onnxruntime on the example and compare with PyTorch (needs onnxruntime).

    Returns the path written (atomically).
    """
    if not isinstance(gm, fx.GraphModule) or "tokenopt.policy" not in gm.meta:
        raise TypeError("tokenopt.export_onnx takes what tokenopt.optimize returned")
    config = gm.meta["tokenopt.policy"]
    adaptive = [p.name for p in config.policies() if p.adaptive]
    if adaptive:
        raise ValueError(f"ONNX export covers fixed-budget policies (none, topk, tome and their composites); "
                         f"{', '.join(adaptive)} decides per-image token counts, which ONNX cannot express "
                         "without data-dependent shapes. Export a top-k or ToMe graph instead.")
    examples = tuple(example_inputs if example_inputs is not None else gm.meta["tokenopt.example_inputs"])
    path = os.fspath(path)
    plain = fx.GraphModule(gm, gm.graph)  # the reduced graph alone (no batch-size rule, no keyword binding)
    dyn = tuple({0: torch.export.Dim("batch")} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                for x in examples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(plain, examples, dynamo=True, dynamic_shapes=dyn, verbose=False)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.onnx", dir=directory)
    os.close(fd)
    try:
        program.save(tmp)
        if verify:
            _verify_onnx(tmp, plain, examples, atol)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _verify_onnx(path: str, gm: fx.GraphModule, examples: tuple, atol: float) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), examples)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(gm(*examples))
    for g, w in zip(got, want):
        err = (torch.from_numpy(g).to(w.dtype) - w.cpu()).abs().max().item()
        if not err <= atol:
            raise RuntimeError(f"the ONNX model differs from PyTorch by {err:.3g} (> {atol:g}) on the example")
