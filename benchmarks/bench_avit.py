"""A-ViT halting on the small Fashion-MNIST ViT: accuracy, tokens per block and throughput, with and
without halting, one run on this machine.

    python benchmarks/bench_avit.py --base out/fmnist_vit --halting out/fmnist_avit

Reads the two training runs' ``model.pt`` (``tokenopt train``, README), builds the plain graph of the
first (``policy="none"``) and the packed halting graph of the second (``policy`` from its log), and
prints test accuracy on the Fashion-MNIST test split, mean tokens per block (the tokens each block runs
on, averaged over blocks and images) and throughput at ``--batch`` (images per second, medians over
``--rounds`` interleaved runs; ratio = halting / no halting). ``--eps`` moves the halting threshold
(``1 - eps``) at inference only: smaller halts later (more tokens run on), larger earlier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="out/fmnist_vit")
    ap.add_argument("--halting", default="out/fmnist_avit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--eps", type=float, default=None,
                    help="halting threshold 1 - eps at inference (default: the eps the model was trained with)")
    ap.add_argument("--json", default="out/bench_avit.json")
    args = ap.parse_args(argv)
    import tokenopt
    from tokenopt.train import _data, evaluate, load_run

    base_cfg, base, _ = load_run(args.base)
    halt_cfg, halted, _ = load_run(args.halting)
    test_x, test_y = _data("test", args.test_images)
    example = (test_x[:2],)
    plain = tokenopt.optimize(base, policy="none", example_inputs=example)
    options = dict(halt_cfg.policy_options, **({} if args.eps is None else {"eps": args.eps}))
    policy = tokenopt.AViT(**options)
    packed = tokenopt.optimize(halted, policy=policy, example_inputs=example)
    rows = {}
    for name, gm in (("no halting", plain), ("halting", packed)):
        acc = evaluate(gm, test_x, test_y)
        counts = [tokenopt.token_counts(gm, test_x[i:i + 500]) for i in range(0, len(test_y), 500)]
        per_block = [torch.cat([c[b] for c in counts]).float().mean().item() for b in counts[0]]
        entering = [float(test_x.shape[-1] // 2) ** 2 + 1] + per_block[:-1]  # tokens each block runs on
        rows[name] = {"accuracy": acc, "tokens_per_block": per_block, "mean_tokens": sum(entering) / len(entering)}
    x = test_x[:args.batch]
    fns = {"no halting": plain, "halting": packed}
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f(x)
        for r in range(args.rounds):
            for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                start = time.perf_counter()
                fns[name](x)
                times[name].append(time.perf_counter() - start)
    for name in fns:
        rows[name]["images_per_second"] = args.batch / statistics.median(times[name])
    ratio = rows["halting"]["images_per_second"] / rows["no halting"]["images_per_second"]
    print(f"Fashion-MNIST test ({len(test_y)} images); throughput at batch {args.batch}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds (medians)")
    print(f"{'model':<12} {'accuracy':>9} {'tokens/block':>12} {'img/s':>8}   running tokens after each block")
    for name, r in rows.items():
        print(f"{name:<12} {r['accuracy']:>9.2%} {r['mean_tokens']:>12.1f} {r['images_per_second']:>8.0f}   "
              + " ".join(f"{t:.0f}" for t in r["tokens_per_block"]))
    print(f"halting vs no halting: throughput {ratio:.2f}x, accuracy "
          f"{100 * (rows['halting']['accuracy'] - rows['no halting']['accuracy']):+.2f} points; policy {policy!r}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "throughput_ratio": ratio, "batch": args.batch, "policy": repr(policy)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
