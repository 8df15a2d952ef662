"""Save and load optimized models: ``tokenopt.save(gm, path)`` / ``tokenopt.load(path)``.

The file is a ``torch.export`` PT2 archive (a zip): the reduced graph as an ``ExportedProgram`` (and
the unreduced one when a batch-size rule keeps it), weights as tensors, and one JSON file,
``tokenopt.json``, with the config, the model facts and what the passes recorded. Nothing is pickled:
the JSON codec below rebuilds only tokenopt's own dataclasses, graph nodes (by name) and a few plain
types, and Hugging Face configs from their dict. The ``tokenopt::`` ops are registered when tokenopt
is imported, so the archive loads in any process that imports it.

Writes are atomic: the archive is built in memory, written to a temporary file next to ``path``, flushed to
disk and renamed over ``path``, so a failed save (a full disk) leaves an existing file as it was. The file
takes the permission bits of the file it replaces, or those the umask gives a new file. Every payload's
SHA-256 is recorded in ``tokenopt.json`` (whose own hash sits beside it) and :func:`load` checks them all
before reading anything, naming the damaged part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import operator
import os
import tempfile
import warnings
import zipfile
import zlib
from typing import Any

import torch
import torch.fx as fx

__all__ = ["save", "load", "load_bytes", "archive_bytes", "export_onnx", "LoadError", "FORMAT"]

FORMAT = 2  # bump when the layout changes; 2: every payload's sha256 in tokenopt.json, checked on load
READABLE = (1, 2)
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
        fields = {k: _decode(x, nodes) for k, x in v.get("fields", {}).items()}
        from tokenopt.policies.base import PolicyConfig

        if issubclass(cls, PolicyConfig):  # a config from a file is validated as one from the API or the CLI
            known = {f.name for f in dataclasses.fields(cls) if f.init}
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ValueError(f"{cls.name}: no option {', '.join(unknown)}; its options are {', '.join(sorted(known))}")
            return cls(**fields)
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
    module, _, name = str(path).partition(":")
    if not module.startswith(prefix):
        raise LoadError(f"the archive names a class outside {prefix[:-1]} ({path}); refusing to load it")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        from tokenopt import __version__

        raise LoadError(f"the file names {path}, which this tokenopt ({__version__}) does not have; it was "
                        "written by another version, or edited: write it again with this version") from exc
    if not isinstance(obj, type):
        raise LoadError(f"the file names {path}, which is not a class; it was edited or damaged")
    return obj


# -- node names across export -----------------------------------------------------------------------------
_BLOCK_KEY, _PROVENANCE_KEY = "tokenopt_block", "tokenopt_provenance"


def _stamp_names(gm: fx.GraphModule) -> None:
    """Stamp each call node's name, block and provenance into ``meta["custom"]``, which export carries over."""
    from tokenopt.ir import META_BLOCK, META_PROVENANCE

    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is not operator.getitem:  # (getitems: by producer and index)
            custom = n.meta.setdefault("custom", {})
            custom[_NAME_KEY] = n.name
            if META_BLOCK in n.meta:
                custom[_BLOCK_KEY] = n.meta[META_BLOCK]
            if n.meta.get(META_PROVENANCE):
                custom[_PROVENANCE_KEY] = json.dumps(n.meta[META_PROVENANCE], default=str)


def _unstamp(gm: fx.GraphModule, restore: bool = False) -> None:
    """Take the stamps off again; ``restore``: first put each node's block and provenance back in its meta."""
    from tokenopt.ir import META_BLOCK, META_PROVENANCE

    for n in gm.graph.nodes:
        custom = n.meta.get("custom")
        if not custom:
            continue
        if restore and _BLOCK_KEY in custom:
            n.meta[META_BLOCK] = custom[_BLOCK_KEY]
        if restore and _PROVENANCE_KEY in custom:
            n.meta[META_PROVENANCE] = json.loads(custom[_PROVENANCE_KEY])
        for key in (_NAME_KEY, _BLOCK_KEY, _PROVENANCE_KEY):
            custom.pop(key, None)
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
    if not isinstance(gm, fx.GraphModule) or "tokenopt.policy" not in gm.meta:
        raise TypeError("tokenopt.save takes what tokenopt.optimize returned")
    path = os.fspath(path)
    check_destination(path, "the model")  # before the export, not after it
    write_atomic(path, archive_bytes(gm))


def archive_bytes(gm: fx.GraphModule) -> bytes:
    """The archive :func:`save` writes, as bytes (what ``torch.save`` / ``pickle`` of an OptimizedModule hold)."""
    from tokenopt import __version__
    from tokenopt.module import OptimizedModule

    examples = tuple(gm.meta["tokenopt.example_inputs"])
    devices = {t.device.type for t in list(gm.parameters()) + list(gm.buffers())}
    if "meta" in devices:
        raise ValueError("tokenopt.save: the model's weights are on the meta device (shapes without values), so "
                         "there is nothing to save; optimize the model with real weights (load them first, e.g. "
                         "model.to_empty(device='cpu') and load_state_dict)")

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

    buffer = io.BytesIO()
    package_pt2(buffer, exported_programs=programs)
    with zipfile.ZipFile(buffer, "a") as z:
        # every payload's content hash, checked by load before anything is read
        doc["sha256"] = {_relative(name): hashlib.sha256(z.read(name)).hexdigest() for name in z.namelist()}
        prefix = z.namelist()[0].split("/", 1)[0]
        text = json.dumps(doc).encode()
        z.writestr(f"{prefix}/extra/{_META_FILE}", text)
        z.writestr(f"{prefix}/extra/{_META_FILE}.sha256", hashlib.sha256(text).hexdigest())
    return buffer.getvalue()


def _relative(name: str) -> str:
    """An archive entry's name without the archive's top folder."""
    return name.split("/", 1)[1] if "/" in name else name


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # (no /proc: read it by setting it back at once)
    os.umask(mask)
    return mask


def file_mode(path: str) -> int:
    """The permission bits a file written to ``path`` should get: the existing file's, else the umask's."""
    return (os.stat(path).st_mode & 0o7777) if os.path.exists(path) else (0o666 & ~_umask())


def check_destination(path: str, what: str = "the file") -> str:
    """The directory ``path`` would be written into, or an error naming ``path`` and the fix (before any work)."""
    path = os.fspath(path)
    if path.endswith(os.sep) or os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} to {path}: it is a folder; give a file name inside it, "
                                f"e.g. {os.path.join(path, 'model.pt2')}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {what} to {path}: the folder {directory} does not exist; create it first")
    try:  # (a probe, not os.access: root passes that check on read-only mounts and on /proc)
        fd, probe = tempfile.mkstemp(prefix=".tokenopt-write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write {what} to {path}: the folder {directory} is not writable "
                              f"({exc.strerror}); choose another folder") from exc
    return directory


def write_atomic(path: str, data) -> None:
    """Write ``data`` (bytes) to ``path`` all at once: a temporary file beside it, flushed to disk, then renamed
    over ``path``. A failure (a full disk, say) leaves an existing file as it was. The new file gets the existing
    file's permission bits, or those a new file gets under the umask (not the temporary file's 0600)."""
    path = os.fspath(path)
    directory = check_destination(path)
    mode = file_mode(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except OSError as exc:
            kept = "the existing file is unchanged" if os.path.exists(path) else "nothing was written"
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; {kept}") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_PARTS = (("models/", "the graph"), ("data/weights/", "the weights"), ("data/constants/", "the constants"),
          ("data/sample_inputs/", "the example inputs"))


def _part(rel: str) -> str:
    """What an archive entry (its name inside the archive's top folder) holds, in words, for error messages."""
    what = next((w for prefix, w in _PARTS if rel.startswith(prefix)), "archive metadata")
    return f"{what} ({rel})"


def _read_doc(path: str, data: bytes) -> dict:
    """``tokenopt.json`` of the archive in ``data``, after checking the archive: a complete zip, a known format,
    and every payload's content hash as saved. Raises :class:`LoadError` naming the damaged part."""
    damaged = (f"{path} is damaged: {{}}. The file changed after tokenopt.save wrote it (a partial copy or "
               "download, or disk corruption); copy it again or save it again from the model")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        if data[:4] == b"PK\x03\x04":
            raise LoadError(damaged.format(f"truncated or cut short ({len(data)} bytes; the zip's directory is "
                                           "missing)")) from exc
        raise LoadError(f"{path} is not a tokenopt archive (not a zip file); tokenopt.load reads the .pt2 files "
                        "tokenopt.save writes") from exc
    with z:
        names = [n for n in z.namelist() if n.endswith("/" + _META_FILE) or n == _META_FILE]
        if not names:
            raise LoadError(f"{path} is not a tokenopt archive (no {_META_FILE} inside); was it written by "
                            "tokenopt.save?")
        try:
            text = z.read(names[0])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise LoadError(damaged.format(f"its metadata ({_META_FILE}) cannot be read: {exc}")) from exc
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LoadError(damaged.format(f"its metadata ({_META_FILE}) is not valid JSON: {exc}")) from exc
        if not isinstance(doc, dict):
            raise LoadError(damaged.format(f"its metadata ({_META_FILE}) is not a JSON object"))
        if doc.get("format") not in READABLE:
            from tokenopt import __version__

            raise LoadError(f"{path} was written by tokenopt {doc.get('tokenopt')} in archive format "
                            f"{doc.get('format')}; this tokenopt ({__version__}) reads format {FORMAT}: save it again "
                            "from the original model with this version")
        hashes = doc.get("sha256")
        if doc["format"] < 2:
            warnings.warn(f"{path} was written before archives carried content hashes: it loads unverified; save "
                          "it again to have it checked on every load", stacklevel=3)
            return doc
        stamp = names[0] + ".sha256"
        if stamp not in z.namelist() or z.read(stamp).decode(errors="replace") != hashlib.sha256(text).hexdigest():
            raise LoadError(damaged.format(f"its metadata ({_META_FILE}) does not match its content hash"))
        if not isinstance(hashes, dict):
            raise LoadError(damaged.format("its list of content hashes is missing"))
        present = {_relative(n): n for n in z.namelist()}
        for rel, want in hashes.items():
            if rel not in present:
                raise LoadError(damaged.format(f"{_part(rel)} is missing"))
            try:
                got = hashlib.sha256(z.read(present[rel])).hexdigest()
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:  # (the zip's own CRC-32 check)
                raise LoadError(damaged.format(f"{_part(rel)} does not match its checksum ({exc})")) from exc
            if got != want:
                raise LoadError(damaged.format(f"{_part(rel)} does not match its content hash"))
    return doc


def load(path: str | os.PathLike):
    """Read an optimized model written by :func:`save`; returns an :class:`~tokenopt.module.OptimizedModule`.

    Raises:
        LoadError: not a tokenopt archive, or written by an incompatible tokenopt or torch version.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; tokenopt.load takes the .pt2 file tokenopt.save wrote")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        data = f.read()  # read once: what is checked is what is loaded
    return load_bytes(data, path)


def load_bytes(data: bytes, path: str = "the archive"):
    """:func:`load` of an archive held in memory (``path`` names it in messages)."""
    import tokenopt.kernels.ops  # noqa: F401  (registers the tokenopt:: ops the graph calls)
    from tokenopt.module import OptimizedModule
    from torch.export.pt2_archive._package import load_pt2

    doc = _read_doc(path, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            contents = load_pt2(io.BytesIO(data))
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
        except (ValueError, TypeError) as exc:  # e.g. a config that fails its own validation
            raise LoadError(f"{path}: {k}: {exc}") from exc
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
    _unstamp(reduced, restore=True)
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

    Works for fixed-budget policies (none, top-k, ToMe, PiToMe) and their composites: every token op has an
    ONNX-expressible decomposition in :func:`tokenopt.kernels.ops.decompositions`, the table passed to
    ``run_decompositions`` here (ToMe's mean merge is an ``index_add`` and a division, not
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
    directory = check_destination(path, "the ONNX model")
    plain = fx.GraphModule(gm, gm.graph)  # the reduced graph alone (no batch-size rule, no keyword binding)
    dyn = tuple({0: torch.export.Dim("batch")} if isinstance(x, torch.Tensor) and x.dim() > 0 else None
                for x in examples)
    from tokenopt.kernels.ops import decompositions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # tokenopt's ops reach ONNX as ATen through the table tokenopt passes here (torch's global table is
        # never written): export, decompose the token ops, then translate the ATen program.
        exported = torch.export.export(plain, examples, dynamic_shapes=dyn, strict=False)
        exported = exported.run_decompositions(decompositions())
        program = torch.onnx.export(exported, examples, dynamo=True, verbose=False)
    mode = file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp.onnx", dir=directory)
    os.close(fd)
    try:
        program.save(tmp)
        if verify:
            _verify_onnx(tmp, plain, examples, atol)
        os.chmod(tmp, mode)
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
