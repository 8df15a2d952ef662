"""Fidelity of an optimized model to the unmodified one, on real labelled images.

Two numbers, both against the unoptimized model of the same run:

* feature agreement: mean cosine similarity of the final features (the model's output) image by image;
* linear-probe accuracy drop: a logistic-regression classifier is trained on the *unoptimized*
  model's features of a Fashion-MNIST train subset, then evaluated on the test set with the
  unoptimized and with the optimized model's features; the drop is in points.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files under
``/usr/share/datasets/fashion-mnist``). Train subset: the first ``n_train`` images of the official
train split (fixed, in file order); test: the first ``n_test`` of the official 10k test split (all
10k by default). Images are resized from 28x28 to the model's size (bilinear), replicated to 3
channels and normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_ROOT", "CLASSES", "load_fashion_mnist", "to_model_input", "extract_features",
    "LinearProbe", "Fidelity", "fidelity",
]

FASHION_MNIST_ROOT = os.environ.get("TOKENOPT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file of unsigned bytes (the MNIST format: magic ``0 0 8 ndim``, ``ndim`` big-endian sizes, data),
    checked: a damaged or foreign file is an error naming it, never a tensor of the wrong values."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a valid Fashion-MNIST IDX file ({why}); reinstall it: "
                          "apt-get install --reinstall dataset-fashion-mnist")

    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise bad(f"cannot be decompressed: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise bad("its header is not that of an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise bad("its header is cut short")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = 1
    for d in dims:
        size *= d
    if len(data) != 4 + 4 * ndim + size:
        raise bad(f"its header says {dims} ({size} bytes of data) but it holds {len(data) - 4 - 4 * ndim}")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(split: str = "test", n: Optional[int] = None, root: Optional[str] = None):
    """``(images uint8 [n, 28, 28], labels int64 [n])``: the first ``n`` of the official split.

    Raises:
        FileNotFoundError: with the install command, when the Debian package is missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    base = Path(root or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    img_file, lbl_file = base / f"{prefix}-images-idx3-ubyte.gz", base / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_file.exists() or not lbl_file.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {base}: apt-get update && apt-get install dataset-fashion-mnist "
            "(or set TOKENOPT_FASHION_MNIST to a folder with the four IDX .gz files)"
        )
    images, labels = _read_idx(img_file), _read_idx(lbl_file).long()
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels) or int(labels.max()) > 9:
        raise ValueError(f"{img_file} and {lbl_file} do not form a Fashion-MNIST split (images {list(images.shape)}, "
                         f"labels {list(labels.shape)}); reinstall: apt-get install --reinstall dataset-fashion-mnist")
    if n is not None:
        if not 0 < n <= len(labels):
            raise ValueError(f"n must be in 1..{len(labels)} for the {split} split; got {n}")
        images, labels = images[:n], labels[:n]
    return images, labels


def to_model_input(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` (or ``[N, H, W]``) -> normalised float ``[N, 3, size, size]``."""
    x = images.float().div(255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - _MEAN) / _STD


def extract_features(
    model: Callable, images: torch.Tensor, *, batch_size: int = 32, size: int = 224,
    progress: bool = True, description: str = "features",
) -> torch.Tensor:
    """Run ``model`` over uint8 images in batches; returns ``[N, D]`` float features."""
    from rich.progress import Progress

    outs = []
    with Progress(disable=not progress, transient=True) as bar, torch.inference_mode():
        task = bar.add_task(description, total=len(images))
        for start in range(0, len(images), batch_size):
            batch = to_model_input(images[start:start + batch_size], size)
            out = model(batch)
            outs.append((out.logits if hasattr(out, "logits") else out).float())
            bar.advance(task, len(batch))
    return torch.cat(outs)


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, L2 penalty)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    l2: float = 1e-3

    # L2 strengths `select` tries (per weight, on standardised features)
    L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)

    @classmethod
    def select(cls, features: torch.Tensor, labels: torch.Tensor, grid: Sequence[float] = L2_GRID) -> "LinearProbe":
        """Fit with the L2 strength that does best on a held-out fifth of ``features`` (every fifth
        sample), then refit on all of them. Only the unoptimized model's features are seen here."""
        held = torch.arange(len(labels)) % 5 == 0
        scores = [cls.fit(features[~held], labels[~held], l2).accuracy(features[held], labels[held]) for l2 in grid]
        best = max(range(len(grid)), key=lambda i: (scores[i], grid[i]))  # ties: the stronger penalty
        probe = cls.fit(features, labels, grid[best])
        probe.l2 = grid[best]
        return probe

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> "LinearProbe":
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        z = (features - mean) / std
        n_classes = int(labels.max()) + 1
        w = torch.zeros(z.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w + b, labels) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(mean, std, w.detach(), b.detach(), l2)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        pred = (((features - self.mean) / self.std) @ self.weight + self.bias).argmax(1)
        return (pred == labels).float().mean().item()


@dataclass
class Fidelity:
    cosine: float
    accuracy_base: float
    accuracy: float

    @property
    def accuracy_drop(self) -> float:
        """Points lost against the unoptimized model (positive = worse)."""
        return 100.0 * (self.accuracy_base - self.accuracy)


def fidelity(probe: LinearProbe, base_features: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> Fidelity:
    """Cosine agreement and probe accuracies of ``features`` against ``base_features`` (same images)."""
    cos = F.cosine_similarity(features, base_features, dim=1).mean().item()
    return Fidelity(cos, probe.accuracy(base_features, labels), probe.accuracy(features, labels))
