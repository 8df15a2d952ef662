"""AdaViT's inference machinery at a chosen gate use, on a random ViT: does the time follow the work?

The gates are set, not learnt: every decision network gets random weights, then each of its outputs a
bias that turns on the wanted share of what it decides on the benchmark images (heads and sub-layers:
images; token gates: the tokens still there), gate by gate in graph order. The graph is then timed
against the same model with no reduction (interleaved rounds, medians) and its FLOPs counted while it
runs. With every share at 1 it measures the machinery's overhead (the gathers and the gate networks).

    python benchmarks/bench_adavit_gates.py                                   # dim 192, depth 6, 3 heads, batch 64
    python benchmarks/bench_adavit_gates.py --heads-on 1 --layers-on 1 --tokens-on 1   # every gate on

2026-12-01, this project's CPU (2 threads), two runs each: with the defaults (heads 67%, sub-layers 80%,
tokens 70% per stage) 1.77x and 1.83x at a FLOPs ratio of 0.52; every gate on 0.87x and 0.92x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def set_gate_use(gm, x: torch.Tensor, heads_on: float, layers_on: float, tokens_on: float, seed: int = 0) -> None:
    """Random decision networks whose gates turn on the given shares on ``x`` (see the module docstring)."""
    from tokenopt.policies.adavit import GateNet, calibrate_usage

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in gm.modules():
            if isinstance(net, GateNet):
                net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=gen))
                net.fc.bias.zero_()
    calibrate_usage(gm, x, shares={"heads": heads_on, "layers": layers_on, "tokens": tokens_on})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--heads-on", type=float, default=0.67)
    ap.add_argument("--layers-on", type=float, default=0.8)
    ap.add_argument("--tokens-on", type=float, default=0.7, help="share of the tokens still there each token stage keeps")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default="out/bench_adavit_gates.json")
    args = ap.parse_args(argv)
    for name in ("heads_on", "layers_on", "tokens_on"):
        if not 0 < getattr(args, name) <= 1:
            ap.error(f"--{name.replace('_', '-')} must be a share in (0, 1]")
    import tokenopt
    from tokenopt.flops import count_flops
    from tokenopt.train import TrainConfig, build_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_model(TrainConfig(embed_dim=args.embed_dim, depth=args.depth, heads=args.heads,
                                    mlp_ratio=args.mlp_ratio)).eval()
    x = torch.randn(args.batch, 1, 28, 28)
    base = tokenopt.optimize(model, policy="none", example_inputs=(x[:2],))
    import warnings

    with warnings.catch_warnings():  # (no trained weights: set below)
        warnings.simplefilter("ignore")
        gm = tokenopt.optimize(model, policy="adavit", example_inputs=(x[:2],))
    set_gate_use(gm, x, args.heads_on, args.layers_on, args.tokens_on)
    used = tokenopt.gate_usage(gm, x)
    heads = statistics.mean(float(u["heads"].float().mean()) for u in used.values())
    subs = statistics.mean(float(u["attn"].float().mean() + u["mlp"].float().mean()) for u in used.values())
    counts = tokenopt.token_counts(gm, x)
    flops = count_flops(gm, x) / count_flops(base, x)
    times = {"base": [], "adavit": []}
    with torch.no_grad():
        for f in (base, gm):
            f(x)
        for _ in range(args.rounds):
            for name, f in (("base", base), ("adavit", gm)):
                start = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - start)
    t_base, t_gm = statistics.median(times["base"]), statistics.median(times["adavit"])
    result = {"heads_per_gated_block": heads, "sub_layers_per_gated_block": subs,
              "tokens_after_each_block": [float(c.float().mean()) for c in counts.values()],
              "flops_ratio": flops, "img_s_base": args.batch / t_base, "img_s_adavit": args.batch / t_gm,
              "throughput_ratio": t_base / t_gm, "config": vars(args)}
    print(f"AdaViT gates set on a random ViT (dim {args.embed_dim}, depth {args.depth}, {args.heads} heads), batch "
          f"{args.batch}, {args.threads} threads, {args.rounds} interleaved rounds (medians)")
    print(f"  heads {heads:.2f} / {args.heads}, sub-layers {subs:.2f} / 2 per gated block; tokens after each block "
          f"{[round(t, 1) for t in result['tokens_after_each_block']]}")
    print(f"  FLOPs ratio {flops:.3f}; base {result['img_s_base']:.0f} img/s, AdaViT {result['img_s_adavit']:.0f} img/s: "
          f"{result['throughput_ratio']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
