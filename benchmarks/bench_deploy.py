"""Deployment figures, one run on this machine: onnxruntime vs PyTorch throughput for the fixed-budget
policies, and where each policy's reduced graph starts to beat the original (``min_batch="auto"``).

    python benchmarks/bench_deploy.py                                  # DeiT-Small, batch 32, fp32, CPU
    python benchmarks/bench_deploy.py --model deit_tiny_patch16_224 --batch 8 --rounds 3 --no-threshold

Throughput: images per second, medians over ``--rounds`` interleaved runs (order rotated), the eager
model, the PyTorch graph and the same graph in onnxruntime on the same batch. Threshold: what
``optimize(..., min_batch="auto")`` measures (gain = original time / reduced time per batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import tokenopt


def _time(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():
        f()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks than the model's (quick runs)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--onnx-policies", nargs="*", default=["topk", "tome"])
    ap.add_argument("--threshold-policies", nargs="*", default=["topk", "tome", "ats"])
    ap.add_argument("--no-threshold", action="store_true")
    ap.add_argument("--json", default="out/bench_deploy.json")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        ap.error("--batch and --rounds must be at least 1")
    import onnxruntime as ort
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, **({"depth": args.depth} if args.depth else {})).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    report = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "onnx": {}, "min_batch": {}}
    print(f"{args.model}, batch {args.batch}, fp32, CPU, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'policy':<8} {'eager img/s':>12} {'torch graph':>12} {'onnxruntime':>12} {'ort/torch':>10} {'ort/eager':>10}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name in args.onnx_policies:
            gm = tokenopt.optimize(model, policy=name)
            path = tokenopt.export_onnx(gm, os.path.join(tmp, f"{name}.onnx"))
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            t = _time({"eager": lambda: model(x), "torch": lambda: gm(x),
                       "ort": lambda: session.run(None, feed)}, args.rounds)
            ips = {k: args.batch / v for k, v in t.items()}
            report["onnx"][name] = ips
            print(f"{name:<8} {ips['eager']:>12.1f} {ips['torch']:>12.1f} {ips['ort']:>12.1f} "
                  f"{ips['ort'] / ips['torch']:>10.2f} {ips['ort'] / ips['eager']:>10.2f}")
    if not args.no_threshold:
        print(f"\nmin_batch='auto' (gain of the reduced graph over the original per batch size, batches "
              f"{tokenopt.module.AUTO_BATCHES})")
        for name in args.threshold_policies:
            gm = tokenopt.optimize(model, policy=name, min_batch="auto")
            gains = gm.meta["tokenopt.min_batch_timings"]
            report["min_batch"][name] = {"threshold": gm.min_batch, "gains": gains}
            print(f"{name:<8} threshold {gm.min_batch:>3}   " + "  ".join(f"b{b}: {g:.2f}" for b, g in gains.items()))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
