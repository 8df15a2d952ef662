"""Per policy: ATen ops and host syncs per forward, and throughput against the original model, eager and
under ``torch.compile``, all measured in one run.

    python benchmarks/bench_machinery.py                         # DeiT-Small, batch 32, fp32, this CPU
    python benchmarks/bench_machinery.py --batch 8 --rounds 3 --no-compile
    python benchmarks/bench_machinery.py --device cuda --dtype float16 --batch 64 256   # on a GPU

Ops and syncs are counted by :func:`tokenopt.profile.count_dispatch` (a tokenopt custom op counts as
one op; syncs are counted inside it too). Throughput ratios are medians over ``--rounds`` rounds, the
order of the variants rotated every round; compiled graphs are compared with the compiled original.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import tokenopt
from tokenopt.profile import count_dispatch

POLICIES = {
    "none": dict(policy="none"),
    "topk": dict(policy="topk"),
    "tome": dict(policy="tome"),
    "ats packed": dict(policy="ats"),
    "ats padded": dict(policy="ats", mode="padded"),
    "topk+tome": dict(policy=[tokenopt.TopK(blocks=(3,)), tokenopt.ToMe(r=13, blocks=tuple(range(4, 12)))]),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, x, rounds: int, device: str) -> dict:
    """Median seconds per call of each of ``fns`` on ``x``: one warm-up call each (compilation included), then
    ``rounds`` rounds with the order rotated every round."""
    times = {k: [] for k in fns}
    names = list(fns)
    with torch.inference_mode():
        for name in names:  # warm-up (and compilation)
            fns[name](x)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                _sync(device)
                start = time.perf_counter()
                fns[name](x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--policies", nargs="*", default=list(POLICIES))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default="out/bench_machinery.json")
    args = ap.parse_args(argv)
    import timm

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device, dtype)
    example = (torch.randn(2, 3, 224, 224, device=args.device, dtype=dtype),)
    graphs = {name: tokenopt.optimize(model, example_inputs=example, **POLICIES[name]) for name in args.policies}
    rows = []
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype)
        base = count_dispatch(model, x)
        eager = time_interleaved({"original": model, **graphs}, x, args.rounds, args.device)
        compiled = {}
        if not args.no_compile:
            torch._dynamo.reset()
            fns = {"original": torch.compile(model)}
            fns.update({k: torch.compile(g, fullgraph=True) for k, g in graphs.items()})
            compiled = time_interleaved(fns, x, args.rounds, args.device)
        print(f"\n{args.model}, batch {batch}, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds (medians)")
        print(f"{'policy':<12} {'ops/fwd':>8} {'ops ratio':>9} {'syncs/fwd':>9} {'eager x':>8} {'compiled x':>10}")
        print(f"{'original':<12} {base.ops:>8} {1.0:>9.2f} {base.syncs:>9} {1.0:>8.2f} {1.0 if compiled else float('nan'):>10.2f}")
        for name, gm in graphs.items():
            c = count_dispatch(gm, x)
            er = eager["original"] / eager[name]
            cr = compiled["original"] / compiled[name] if compiled else float("nan")
            print(f"{name:<12} {c.ops:>8} {c.ops / base.ops:>9.2f} {c.syncs:>9} {er:>8.2f} {cr:>10.2f}")
            rows.append({"batch": batch, "policy": name, "ops": c.ops, "ops_ratio": c.ops / base.ops,
                         "syncs": c.syncs, "eager_ratio": er, "compiled_ratio": cr})
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "dtype": args.dtype, "device": args.device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
