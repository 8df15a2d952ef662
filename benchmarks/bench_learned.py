"""Learned and training-free policies on the small Fashion-MNIST ViT: one table, one run on this machine.

    python benchmarks/bench_learned.py                          # after the training runs of the README
    python benchmarks/bench_learned.py --runs out/fmnist192     # the runs of scripts/train_learned.sh OUT

Reads the ``tokenopt train`` runs (``--base`` the plain model; ``--avit``, ``--adavit``, ``--sait``, ``--dynamicvit``
their fine-tuned models, with ``policy.pt`` where the policy has weights of its own) and builds each
policy's inference graph; the training-free policies (ATS, ToMe) run on the base model. Per row: test
accuracy on the Fashion-MNIST test split, mean tokens per block (rows entering each block's MLP, per
image, averaged over blocks and images), heads and sub-layers run per block (AdaViT's gates; every other
policy runs them all), FLOPs per image counted while the graph runs (``FlopCounterMode``,
so per-image counts count) as a ratio to the base model's, and throughput as a ratio to the base model's.
Throughput: each round runs every graph, in alternating order, on ``--timing-batches`` distinct batches of
``--batch`` test images (adaptive policies do different work on different images); per graph the median
over ``--rounds`` rounds of its time for them all, and the spread of its ratio to the base model in the same
round (lowest and highest of the rounds). FLOPs are counted on the same images. A run that is missing is
skipped, and said.

``--tune-malloc`` keeps glibc from handing large tensors' memory back to the system after every op
(``mallopt``: mmap threshold 32 MiB, trim threshold 4000 MiB, top pad 512 MiB; what
``MALLOC_MMAP_THRESHOLD_`` etc. set from the environment). By default a large tensor's memory is
faulted in afresh on each allocation; in one measurement that slowed the base model most, so it changes
the ratios (docs/RESULTS.md, Speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.fx as fx


def tune_malloc() -> None:
    """glibc's allocator: keep freed memory for reuse instead of unmapping it (see the module docstring)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        raise SystemExit(f"--tune-malloc: no glibc here ({exc}); run without it") from exc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 4000 << 20), (m_top_pad, 512 << 20)):
        if libc.mallopt(option, value) != 1:
            raise SystemExit(f"--tune-malloc: mallopt({option}, {value}) failed; run without it")


def mlp_tokens(gm: fx.GraphModule, x: torch.Tensor) -> list[float]:
    """Per block, the token rows entering its MLP, per image (a packed buffer's rows shared out)."""
    from tokenopt.ir import MODEL_INFO

    fc1 = {b.mlp.linears[0]: b.index for b in gm.meta[MODEL_INFO].blocks}
    rows: dict[int, float] = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            if n in fc1:
                inp = self.env[n.args[0]]
                rows[fc1[n]] = inp.numel() / inp.shape[-1] / x.shape[0]
            return super().run_node(n)

    with torch.no_grad():
        _Rec(gm).run(x)
    return [rows[b] for b in sorted(rows)]


def gates_run(gm: fx.GraphModule, x: torch.Tensor) -> tuple[float, float]:
    """Mean heads and sub-layers (attention, MLP) run per block and image: AdaViT's gates
    (``tokenopt.gate_usage``); a block without gates runs all of them."""
    import tokenopt
    from tokenopt.ir import MODEL_INFO

    blocks = gm.meta[MODEL_INFO].blocks
    used = tokenopt.gate_usage(gm, x)
    heads = sum(float(used[b.index]["heads"].float().mean()) if b.index in used else b.attention.num_heads
                for b in blocks) / len(blocks)
    subs = sum(float(used[b.index]["attn"].float().mean() + used[b.index]["mlp"].float().mean()) if b.index in used
               else 2.0 for b in blocks) / len(blocks)
    return heads, subs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", help="a scripts/train_learned.sh folder: RUNS/base, RUNS/avit, RUNS/adavit, RUNS/sait, "
                                   "RUNS/dvit (each overridable by its own option)")
    ap.add_argument("--base")
    ap.add_argument("--avit")
    ap.add_argument("--adavit")
    ap.add_argument("--sait")
    ap.add_argument("--sait-densities", default="0.65,0.8", help="two densities, same weights")
    ap.add_argument("--dynamicvit")
    ap.add_argument("--set", action="append", default=[], metavar="POLICY.KEY=VALUE",
                    help="an inference option over the trained run's, e.g. --set avit.eps=0.001 --set dynamicvit.rho=0.8")
    ap.add_argument("--tome-r", type=int, default=16)
    ap.add_argument("--ats-max", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--timing-batches", type=int, default=4, help="distinct batches timed per round (default 4)")
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--json", default="out/bench_learned.json")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc keeps freed memory (see above)")
    args = ap.parse_args(argv)
    if args.tune_malloc:
        tune_malloc()
    layout = {"base": ("base", "out/fmnist_vit"), "avit": ("avit", "out/fmnist_avit"), "adavit": ("adavit", "out/fmnist_adavit"),
              "sait": ("sait", "out/fmnist_sait"), "dynamicvit": ("dvit", "out/fmnist_dvit")}
    for name, (sub, default) in layout.items():
        if getattr(args, name) is None:
            setattr(args, name, os.path.join(args.runs, sub) if args.runs else default)
    from tokenopt.cli import _parse_sets

    pairs: dict[str, list[str]] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        policy, dot, option = key.partition(".")
        if not (sep and dot and option):
            ap.error(f"--set {item!r}: expected POLICY.KEY=VALUE, e.g. avit.eps=0.001")
        pairs.setdefault(policy, []).append(f"{option}={value}")
    overrides = {policy: _parse_sets(options) for policy, options in pairs.items()}
    import tokenopt
    from tokenopt.flops import count_flops
    from tokenopt.train import _data, evaluate, load_run as _load

    test_x, test_y = _data("test", args.test_images)
    example = (test_x[:2],)
    _, base, _ = _load(args.base)
    graphs = {"base (no reduction)": tokenopt.optimize(base, policy="none", example_inputs=example)}
    graphs[f"ATS (max {args.ats_max})"] = tokenopt.optimize(base, policy=tokenopt.ATS(max_tokens=args.ats_max),
                                                            example_inputs=example)
    graphs[f"ToMe (r={args.tome_r})"] = tokenopt.optimize(base, policy=tokenopt.ToMe(r=args.tome_r), example_inputs=example)
    skipped = []
    for name, run in (("A-ViT", args.avit), ("AdaViT", args.adavit), ("SaiT", args.sait), ("DynamicViT", args.dynamicvit)):
        if not os.path.exists(os.path.join(run, "model.pt")):
            skipped.append(f"{name} ({run}: no model.pt)")
            continue
        cfg, model, policy_state = _load(run)
        extra = overrides.pop(cfg.policy, {})
        policy = tokenopt.policies.make_config(cfg.policy, **{**cfg.policy_options, **extra})
        if extra:
            name += " (" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")"
        gm = tokenopt.optimize(model, policy=policy, example_inputs=example, policy_state=policy_state)
        if name.startswith("SaiT"):  # one graph, its density knob set before each use
            for d in (float(v) for v in args.sait_densities.split(",")):
                graphs[f"SaiT (density {d})"] = (gm, {"density": d})
        else:
            graphs[name] = gm
    if overrides:
        ap.error(f"--set names {', '.join(sorted(overrides))}: no such trained run here (avit, adavit, sait, dynamicvit)")
    graphs = {k: v if isinstance(v, tuple) else (v, {}) for k, v in graphs.items()}

    def use(name):
        gm, knobs = graphs[name]
        for k, v in knobs.items():
            setattr(gm, k, v)
        return gm

    if args.batch < 1 or args.timing_batches < 1 or args.rounds < 1:
        ap.error("--batch, --timing-batches and --rounds must be at least 1")
    if args.batch * args.timing_batches > len(test_x):
        ap.error(f"--batch {args.batch} x --timing-batches {args.timing_batches} is more than the {len(test_x)} test images")
    batches = test_x[:args.batch * args.timing_batches].split(args.batch)
    timed = args.batch * len(batches)

    def flops(gm):
        return sum(count_flops(gm, xb) for xb in batches) / timed

    rows = {}
    base_flops = flops(use("base (no reduction)"))
    for name in graphs:
        gm = use(name)
        tokens = mlp_tokens(gm, test_x[:500])
        heads, sublayers = gates_run(gm, test_x[:500])
        rows[name] = {"accuracy": evaluate(gm, test_x, test_y), "tokens_per_block": tokens,
                      "mean_tokens": sum(tokens) / len(tokens), "heads_per_block": heads, "sublayers_per_block": sublayers,
                      "flops_ratio": flops(gm) / base_flops}
        print(f"measured {name}", flush=True)
    times = {k: [] for k in graphs}
    names = list(graphs)
    with torch.no_grad():
        for name in names:
            use(name)(batches[0])
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                gm = use(name)  # (setting a knob is a buffer fill: outside the timed calls)
                spent = 0.0
                for xb in batches:
                    start = time.perf_counter()
                    gm(xb)
                    spent += time.perf_counter() - start
                times[name].append(spent)
    base_times = times["base (no reduction)"]
    ref = timed / statistics.median(base_times)
    for name in names:
        per_round = [b / t for b, t in zip(base_times, times[name])]
        rows[name]["images_per_second"] = timed / statistics.median(times[name])
        rows[name]["throughput_ratio"] = rows[name]["images_per_second"] / ref
        rows[name]["throughput_ratio_rounds"] = [min(per_round), max(per_round)]
    base_acc = rows["base (no reduction)"]["accuracy"]
    print(f"Fashion-MNIST test ({len(test_y)} images); throughput at batch {args.batch} on {len(batches)} batches, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (medians; the ratio's range over the "
          f"rounds){', glibc tuned (--tune-malloc)' if args.tune_malloc else ''}")
    print("| policy | accuracy | drop (points) | tokens/block | heads/block | sub-layers/block | FLOPs ratio | img/s | "
          "throughput ratio | its range |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.2%} | {100 * (base_acc - r['accuracy']):.2f} | {r['mean_tokens']:.1f} | "
              f"{r['heads_per_block']:.2f} | {r['sublayers_per_block']:.2f} | "
              f"{r['flops_ratio']:.2f} | {r['images_per_second']:.0f} | {r['throughput_ratio']:.2f}x | "
              f"{r['throughput_ratio_rounds'][0]:.2f}-{r['throughput_ratio_rounds'][1]:.2f} |")
    for s in skipped:
        print(f"skipped: {s}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "batch": args.batch, "timing_batches": len(batches), "rounds": args.rounds,
                       "tune_malloc": args.tune_malloc, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
