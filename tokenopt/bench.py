"""Throughput and FLOPs of optimized models against the unmodified one, measured in the same run.

Used by ``benchmarks/`` and the ``tokenopt bench`` command. Timing interleaves the variants (one call
of each per round) so that drift of the machine hits all of them alike; the figure kept is the
median over rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from tokenopt.flops import count_flops

__all__ = ["Variant", "BenchResult", "benchmark", "print_results", "save_json"]


@dataclass
class Variant:
    """One thing to time: a name, a callable model, and what to show about it."""

    name: str
    fn: Callable
    policy: str = ""
    tokens_per_block: Optional[list[float]] = None


@dataclass
class BenchResult:
    name: str
    policy: str
    flops: int
    seconds: float
    images_per_second: float
    flops_ratio: float = 1.0
    throughput_ratio: float = 1.0
    efficiency: float = 1.0
    mean_tokens: Optional[float] = None
    tokens_per_block: Optional[list[float]] = None
    all_seconds: list[float] = field(default_factory=list)


def benchmark(
    variants: Sequence[Variant],
    inputs: torch.Tensor,
    *,
    rounds: int = 5,
    warmup: int = 1,
    baseline: Optional[str] = None,
    progress: bool = True,
) -> list[BenchResult]:
    """Time every variant on ``inputs`` and compare it with the baseline (the first variant).

    Returns:
        one :class:`BenchResult` per variant: ``throughput_ratio`` is baseline time / variant time,
        ``flops_ratio`` variant FLOPs / baseline FLOPs, and ``efficiency`` the throughput gain over the
        FLOPs-proportional ideal gain (``throughput_ratio * flops_ratio``; 1.0 means the model got as
        much faster as its FLOPs fell).
    """
    from rich.progress import Progress

    variants = list(variants)
    batch = inputs.shape[0]
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    total = len(variants) * (rounds + warmup + 1)
    with Progress(disable=not progress, transient=True) as bar, torch.inference_mode():
        task = bar.add_task("benchmark", total=total)
        flops = {}
        for v in variants:
            bar.update(task, description=f"counting FLOPs: {v.name}")
            flops[v.name] = count_flops(v.fn, inputs)
            bar.advance(task)
        for r in range(warmup + rounds):
            # each round starts at the next variant, so no variant always runs right after the same one
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                bar.update(task, description=f"round {r + 1}/{warmup + rounds}: {v.name}")
                start = time.perf_counter()
                v.fn(inputs)
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[v.name].append(elapsed)
                bar.advance(task)
    base = baseline or variants[0].name
    base_t = statistics.median(times[base])
    results = []
    for v in variants:
        t = statistics.median(times[v.name])
        fr = flops[v.name] / flops[base]
        tr = base_t / t
        tpb = v.tokens_per_block
        results.append(BenchResult(
            v.name, v.policy, flops[v.name], t, batch / t, fr, tr, tr * fr,
            mean_tokens=(sum(tpb) / len(tpb)) if tpb else None, tokens_per_block=tpb, all_seconds=times[v.name],
        ))
    return results


def print_results(results: Sequence[BenchResult], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("variant", "GFLOPs/img", "FLOPs ratio", "img/s", "throughput ratio", "efficiency", "mean tokens/block"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in results:
        batch = round(r.images_per_second * r.seconds)
        table.add_row(
            r.name, f"{r.flops / 1e9 / batch:.2f}", f"{r.flops_ratio:.3f}", f"{r.images_per_second:.1f}",
            f"{r.throughput_ratio:.3f}", f"{r.efficiency:.3f}",
            "" if r.mean_tokens is None else f"{r.mean_tokens:.1f}",
        )
    (console or Console(width=160)).print(table)


def save_json(results: Sequence[BenchResult], path: str, **context) -> None:
    with open(path, "w") as f:
        json.dump({"context": context, "results": [asdict(r) for r in results]}, f, indent=2)
