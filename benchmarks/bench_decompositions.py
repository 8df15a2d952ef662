"""Should ``torch.compile`` see tokenopt's token ops as calls (the custom op, its fake giving the shapes) or as
their ATen decompositions (which inductor can fuse with the neighbouring ops)? Both, timed in one run.

    python benchmarks/bench_decompositions.py                      # DeiT-Small, batch 32, this CPU
    python benchmarks/bench_decompositions.py --device cuda --batch 64 256

"call": a plain ``torch.compile(gm)`` (what a user writes; tokenopt writes nothing into torch's global tables,
so inductor calls each op). "decomposed": the same graph compiled with inductor's table plus
``tokenopt.kernels.ops.decompositions(export=False)`` passed explicitly to ``compile_fx``. Prints each time and
the ratio call/decomposed (above 1: decomposing is faster); medians over ``--rounds``, the order rotated.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

import tokenopt

POLICIES = {
    "topk": dict(policy="topk"),
    "tome": dict(policy="tome"),
    "pitome": dict(policy="pitome", r=13),
    "ats padded": dict(policy="ats", mode="padded"),
}


def main(argv=None) -> int:
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    from bench_machinery import time_interleaved  # (this folder: on sys.path when run as a script)

    from tokenopt.kernels.ops import decompositions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval().to(args.device)
    backend = functools.partial(compile_fx, decompositions={**select_decomp_table(), **decompositions(export=False)})
    results = {}
    for batch in args.batch:
        x = torch.randn(batch, 3, 224, 224, device=args.device)
        for name in args.policies:
            gm = tokenopt.optimize(model, example_inputs=(x[:2],), **POLICIES[name])
            torch._dynamo.reset()
            fns = {"call": torch.compile(gm), "decomposed": torch.compile(gm, backend=backend)}
            med = time_interleaved(fns, x, args.rounds, args.device)
            results[f"{name} b{batch}"] = {**{k: v * 1e3 for k, v in med.items()},
                                           "call/decomposed": med["call"] / med["decomposed"]}
            print(f"{name:<11} batch {batch:>4}: call {med['call'] * 1e3:8.1f} ms, decomposed "
                  f"{med['decomposed'] * 1e3:8.1f} ms, call/decomposed {med['call'] / med['decomposed']:.3f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
