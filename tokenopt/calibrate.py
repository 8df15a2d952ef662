"""Per-block budgets found on the user's own images: ``tokenopt.calibrate``.

A fixed-budget policy spends its budget the same way in every block unless told otherwise; the best
split depends on the model (DiffRate, ICCV 2023, searches per-block rates by gradient on frozen
weights; ``shared/METHODS.md``). ``calibrate`` searches a policy's per-block budget on a sample for a
target cost and returns the config whose outputs stay closest to the model's:

* **Schedules.** A per-block budget is one of a few shapes scaled by one number ``s``: ``constant``
  (the same in every block), ``decreasing`` (most in the first blocks, where tokens are redundant
  patches) and ``increasing`` (most in the last blocks). For ToMe and PiToMe the budget is ``r`` per block.
* **Target.** ``flops=0.5``: the FLOPs ratio to the model, counted while the reduced graph runs on the
  sample; or ``throughput=1.8``: the throughput ratio measured on this machine at the sample's batch.
  For each shape, bisection on ``s`` finds the least reduction that meets the target.
* **Fidelity.** The mean cosine similarity of the reduced graph's outputs to the model's on the sample
  (the user can pass a ``metric(output, reference) -> float``, higher is better, e.g. accuracy).

The model is captured once; each candidate reuses that capture (``api._build`` on a copy of the
graph), so a search costs a few reduced graphs and a few runs on the sample.

    >>> import torch, timm, tokenopt
    >>> model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64, patch_size=8).eval()
    >>> result = tokenopt.calibrate(model, "tome", torch.randn(8, 3, 64, 64), flops=0.7, progress=False)
    >>> result.flops_ratio <= 0.7
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

__all__ = ["calibrate", "Calibration", "SHAPES"]

SHAPES = ("constant", "decreasing", "increasing")
#: the policies whose budget is ``r`` tokens merged per block (at most half the patches of a block)
PER_BLOCK_R = ("tome", "pitome")


@dataclasses.dataclass
class Calibration:
    """What :func:`calibrate` found: ``config`` (pass it to ``optimize``), its ``fidelity`` on the
    sample, its cost (``flops_ratio``, and ``throughput_ratio`` when measured) and every candidate tried
    (``candidates``: dicts with shape, scale, budget, cost and fidelity)."""

    config: Any
    fidelity: float
    flops_ratio: float
    throughput_ratio: Optional[float]
    target: dict
    candidates: list

    def to_json(self) -> dict:
        from tokenopt.saving import _encode

        return {"format": "tokenopt.calibration", "version": 1, "policy": self.config.name,
                "config": _encode(self.config), "fidelity": self.fidelity, "flops_ratio": self.flops_ratio,
                "throughput_ratio": self.throughput_ratio, "target": self.target, "candidates": self.candidates}

    def save(self, path: str) -> None:
        """Write the result as JSON; ``tokenopt.optimize(model, policy=path)`` reads the config back."""
        import os

        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)


def load_config(path: str):
    """The policy config of a calibration JSON written by :meth:`Calibration.save`."""
    from tokenopt.saving import LoadError, _decode

    try:
        with open(path) as f:
            doc = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); tokenopt calibrate --out writes a calibration file") from exc
    if not isinstance(doc, dict) or doc.get("format") != "tokenopt.calibration" or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{path} is not a tokenopt calibration file (tokenopt calibrate --out writes one)")
    try:  # the config's own validation, the one path the API and the CLI take too
        config = _decode(doc["config"], {})
    except (ValueError, TypeError, LoadError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    from tokenopt.policies.base import PolicyConfig

    if not isinstance(config, PolicyConfig):
        raise ValueError(f"{path}: its config is not a policy config ({type(config).__name__})")
    return config


def _budget(policy: str, shape: str, scale: float, depth: int) -> tuple:
    """The per-block budget of ``shape`` at ``scale`` (ToMe: tokens merged per block)."""
    if shape == "constant":
        weights = [1.0] * depth
    elif shape == "decreasing":
        weights = [2.0 * (depth - b) / (depth + 1) for b in range(depth)]
    elif shape == "increasing":
        weights = [2.0 * (b + 1) / (depth + 1) for b in range(depth)]
    else:
        raise ValueError(f"unknown schedule shape {shape!r}; choose from {', '.join(SHAPES)}")
    return tuple(int(round(scale * w)) for w in weights)


def _cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1).mean())


def calibrate(
    model: torch.nn.Module,
    policy: str = "tome",
    sample: Optional[torch.Tensor] = None,
    *,
    flops: Optional[float] = None,
    throughput: Optional[float] = None,
    shapes: Sequence[str] = SHAPES,
    metric: Optional[Callable[[torch.Tensor, torch.Tensor], float]] = None,
    rounds: int = 5,
    steps: int = 7,
    progress: bool = True,
) -> Calibration:
    """Search ``policy``'s per-block budget on ``sample`` for a cost target; keep the most faithful.

    Args:
        model: the ViT (not modified).
        policy: ``"tome"`` or ``"pitome"`` (``r`` per block).
        sample: the user's images ``[N, C, H, W]`` (a few dozen are enough), the model's input.
        flops: target FLOPs ratio in (0, 1), counted while the graph runs on the sample; or
        throughput: target throughput ratio (> 1) measured on this machine at the sample's batch.
        shapes: the schedule shapes to try (:data:`SHAPES`).
        metric: ``metric(output, reference_output) -> float`` (higher is better); default mean cosine.
        rounds: timed runs per measurement (throughput target).
        steps: bisection steps per shape (the budget's scale to within ``2 ** -steps`` of its range).
        progress: a progress display while searching.

    Returns:
        A :class:`Calibration`; ``result.config`` goes to ``optimize(model, policy=result.config)`` and
        ``result.save(path)`` writes JSON that ``optimize(model, policy=path)`` reads.
    """
    from tokenopt.api import _build, _copy_graph
    from tokenopt.capture import capture
    from tokenopt.flops import count_flops
    from tokenopt.passes.find_blocks import find_blocks, get_model_info
    from tokenopt.policies import make_config

    if policy not in PER_BLOCK_R:
        raise ValueError(f"calibrate searches per-block budgets for policy in {PER_BLOCK_R}; got {policy!r}")
    if (flops is None) == (throughput is None):
        raise ValueError("give one target: flops=<ratio in (0, 1)> or throughput=<ratio > 1>, e.g. flops=0.5")
    if flops is not None and not (isinstance(flops, (int, float)) and 0 < flops < 1):
        raise ValueError(f"flops must be a ratio in (0, 1), the reduced model's share of the model's FLOPs; got {flops!r}")
    if throughput is not None and not (isinstance(throughput, (int, float)) and throughput > 1):
        raise ValueError(f"throughput must be a ratio > 1 (e.g. 1.8: 1.8x the model's images per second); got {throughput!r}")
    if not isinstance(sample, torch.Tensor) or sample.dim() < 2 or sample.shape[0] < 2:
        raise ValueError("sample must be a batch of at least 2 of your images, shaped as the model's input "
                         "(e.g. torch.Size([32, 3, 224, 224]))")
    if not torch.isfinite(sample).all():
        raise ValueError("sample has NaN or infinite values; calibrate on real images")
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        raise ValueError(f"shapes must be some of {', '.join(SHAPES)}; got {list(shapes)!r}")
    was = model.training
    model.eval()
    try:
        captured = capture(model, (sample[:2],))
        captured.meta.pop("tokenopt.generic", None)

        def fresh() -> fx.GraphModule:  # a copy of the capture that passes may rewrite
            gm = fx.GraphModule(captured, _copy_graph(captured.graph))
            gm.meta = dict(captured.meta)
            return gm

        probe = fresh()
        find_blocks(probe)
        info = get_model_info(probe)
        depth, tokens = len(info.blocks), info.num_tokens
        with torch.no_grad():
            reference = model(sample)
        score = metric or _cosine
        build = {"mode": "padded", "kernels": "reference", "dense": False, "keep_original": False}

        def make(budget):
            return _build(fresh(), make_config(policy, r=budget), build)[0]

        def timed(fn) -> float:
            with torch.no_grad():
                fn(sample)
                runs = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    fn(sample)
                    runs.append(time.perf_counter() - start)
            return statistics.median(runs)

        base_flops = count_flops(model, sample[:2])
        base_time = timed(model) if throughput is not None else None
        candidates: list[dict] = []

        def evaluate(shape: str, scale: float) -> dict:
            budget = _budget(policy, shape, scale, depth)
            gm = make(budget)
            with torch.no_grad():
                fid = float(score(gm(sample), reference))
            row = {"shape": shape, "scale": round(scale, 3), "budget": list(budget),
                   "flops_ratio": count_flops(gm, sample[:2]) / base_flops, "fidelity": fid}
            if throughput is not None:
                row["throughput_ratio"] = base_time / timed(gm)
            candidates.append(row)
            return row

        def meets(row) -> bool:
            return row["flops_ratio"] <= flops if flops is not None else row["throughput_ratio"] >= throughput

        bar = _Progress(progress, total=len(shapes))
        best = None
        top = (tokens - info.num_prefix_tokens) / 2  # (ToMe, PiToMe) merge at most half the patches of a block
        for shape in shapes:
            bar.note(f"{shape}: searching")
            lo, hi = 0.0, top
            row_hi = evaluate(shape, hi)
            if not meets(row_hi):
                bar.advance(f"{shape}: the target is out of reach (at most {row_hi['flops_ratio']:.2f} FLOPs)")
                continue
            chosen = row_hi
            for _ in range(steps):  # bisection: the least reduction that meets the target
                mid = (lo + hi) / 2
                row = evaluate(shape, mid)
                if meets(row):
                    hi, chosen = mid, row
                else:
                    lo = mid
            if best is None or chosen["fidelity"] > best["fidelity"]:
                best = chosen
            bar.advance(f"{shape}: fidelity {chosen['fidelity']:.4f} at {chosen['flops_ratio']:.2f} FLOPs")
        bar.stop()
        if best is None:
            raise ValueError(f"no {policy} schedule meets the target ({'flops' if flops is not None else 'throughput'}="
                             f"{flops if flops is not None else throughput}) on this model; ask for less reduction")
        return Calibration(config=make_config(policy, r=tuple(best["budget"])), fidelity=best["fidelity"],
                           flops_ratio=best["flops_ratio"], throughput_ratio=best.get("throughput_ratio"),
                           target={"flops": flops} if flops is not None else {"throughput": throughput},
                           candidates=candidates)
    finally:
        model.train(was)


class _Progress:
    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
            self.task = self.bar.add_task("", total=total, info="")

    def note(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=info)

    def advance(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
