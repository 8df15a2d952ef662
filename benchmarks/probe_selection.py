"""Which tokens can a trained ViT lose? Pruning criteria compared at the same token count.

    python benchmarks/probe_selection.py --run out/c192/base --block 1 --keep 150,100,60

At block ``--block`` (after its attention, where top-k, EViT and SaiT prune) every image keeps ``K``
patch tokens, chosen by one criterion per column, and the rest of the model runs on those (tokenopt's
padded graph, so the tokens are really gone). Columns:

- ``cls@b``: the head-averaged CLS attention of block ``b``, highest first. ``b`` = ``--block`` is the
  criterion of top-k / EViT / SaiT (``tokenopt.TopK``); a later ``b`` is an *oracle*: the scores come from
  a dense pass of the same images, so it shows what distilling later layers' token importance into the
  pruning layer could at best select (SaiT's "distillation to sharpen early-layer selection").
- ``random``: uniformly random tokens (the mean of ``--seeds`` draws): the floor a criterion must beat.

A check at every K (when ``--block`` is among the sources): ``cls@block`` by the score path and by
``tokenopt.TopK`` must give the same logits on the first batch, or the script exits.
Both policies below are written in a few lines with the public policy API (docs/ARCHITECTURE.md,
"Writing a policy").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

import tokenopt
from tokenopt.ir import MODEL_INFO, Keep

aten = torch.ops.aten
SCORES = "probe_scores"  # the buffer a GivenScores graph reads its [B, 1, L] scores from


@dataclasses.dataclass(frozen=True)
class GivenScores(tokenopt.PolicyConfig):
    """Keep the ``keep`` patch tokens with the highest scores in the graph's ``probe_scores`` buffer
    (``[B, 1, L]``, set before each call), or random ones when ``random``."""

    keep: int = 100
    blocks: tuple = (1,)
    random: bool = False
    name = "given_scores"

    def decide(self, ctx):
        ctx.require_dense("a fixed token count")
        if self.random:
            noise = ctx.call(aten.rand_like.default, ctx.value_norms())  # [B, L]
            scores = ctx.call(aten.unsqueeze.default, noise, 1)
        else:
            if not hasattr(ctx.gm, SCORES):
                ctx.gm.register_buffer(SCORES, torch.zeros(1, 1, ctx.length))
            with ctx.gm.graph.inserting_before(ctx.call.anchor):
                scores = ctx.gm.graph.get_attr(SCORES)
        idx = ctx.call(torch.ops.tokenopt.topk_select.default, scores, self.keep, ctx.num_prefix)
        return Keep(idx, ctx.num_prefix + self.keep)


def cls_attention(dense, x: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    """``{b: [B, 1, L]}``: the head-averaged CLS attention of each block in ``blocks``, from a dense pass
    (read off the q and k nodes the block finder found, so any ViT ``optimize`` accepts will do)."""
    from tokenopt.passes.patterns import record

    info = dense.meta[MODEL_INFO].blocks
    nodes = [n for b in blocks for n in (info[b].attention.q, info[b].attention.k)]
    seen = record(dense, nodes, x)
    return {b: torch.ops.tokenopt.cls_attention(seen[info[b].attention.q], seen[info[b].attention.k],
                                               info[b].attention.scale, None).mean(1, keepdim=True)
            for b in blocks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="out/c192/base", help="a `tokenopt train` run (its model.pt and log.json)")
    ap.add_argument("--block", type=int, default=1, help="prune after this block's attention (0-based)")
    ap.add_argument("--keep", default="150,100,60", help="patch tokens kept per image, comma-separated")
    ap.add_argument("--sources", default=None, help="blocks whose CLS attention ranks the tokens (default: "
                                                    "--block and every later block)")
    ap.add_argument("--seeds", type=int, default=2, help="random draws averaged in the random column")
    ap.add_argument("--images", type=int, default=2000, help="first N Fashion-MNIST test images")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--json", default="out/probe_selection.json")
    args = ap.parse_args(argv)
    from tokenopt.train import _data, evaluate, load_run

    torch.manual_seed(0)
    _, model, _ = load_run(args.run)
    x, y = _data("test", args.images)
    example = (x[:2],)
    dense = tokenopt.optimize(model, policy="none", example_inputs=example)
    depth = len(dense.meta[MODEL_INFO].blocks)
    if not 0 <= args.block < depth - 1:
        ap.error(f"--block must be in 0..{depth - 2} (a later block must run on the kept tokens); got {args.block}")
    sources = ([int(b) for b in args.sources.split(",")] if args.sources else list(range(args.block, depth)))
    if any(not 0 <= b < depth for b in sources):
        ap.error(f"--sources must name blocks 0..{depth - 1}; got {sources}")
    keeps = [int(k) for k in args.keep.split(",")]
    t0 = time.time()
    base = evaluate(dense, x, y, args.batch)
    scores = [cls_attention(dense, x[i:i + args.batch], sources) for i in range(0, len(y), args.batch)]

    def accuracy(gm, src: int) -> float:
        """``evaluate`` batch by batch, with each batch's block-``src`` scores set in the graph first."""
        correct = 0.0
        for j, i in enumerate(range(0, len(y), args.batch)):
            setattr(gm, SCORES, scores[j][src])
            correct += evaluate(gm, x[i:i + args.batch], y[i:i + args.batch], args.batch) * len(y[i:i + args.batch])
        return correct / len(y)

    patches = dense.meta[MODEL_INFO].num_patch_tokens
    rows = []
    for keep in keeps:
        given = tokenopt.optimize(model, policy=GivenScores(keep=keep, blocks=(args.block,)), example_inputs=example)
        row = {"keep": keep, **{f"cls@{b}": accuracy(given, b) for b in sources}}
        if args.block in sources:  # the score path at the pruning block is top-k by CLS attention: the same selection
            topk = tokenopt.optimize(model, policy=tokenopt.TopK(keep_rate=(keep - 0.5) / patches, blocks=(args.block,)),
                                     example_inputs=example)
            setattr(given, SCORES, scores[0][args.block])
            with torch.no_grad():
                got, want = given(x[:args.batch]), topk(x[:args.batch])
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"check failed: the score path at block {args.block} differs from TopK by up to "
                                 f"{(got - want).abs().max():.3g} in the logits (K={keep})")
        rand = tokenopt.optimize(model, policy=GivenScores(keep=keep, blocks=(args.block,), random=True),
                                 example_inputs=example)
        row["random"] = sum(evaluate(rand, x, y, args.batch) for _ in range(args.seeds)) / args.seeds
        rows.append(row)
        print(f"kept {keep}: " + ", ".join(f"{k} {v:.2%}" for k, v in row.items() if k != "keep"), flush=True)
    cols = [f"cls@{b}" for b in sources] + ["random"]
    print(f"\n{args.run}, first {len(y)} Fashion-MNIST test images; no pruning: {base:.2%}. Pruned after block "
          f"{args.block}'s attention to K patch tokens (of {patches}); cls@{args.block} is top-k / SaiT's criterion, "
          f"later cls@b an oracle from a dense pass ({time.time() - t0:.0f} s)")
    print("| K | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for row in rows:
        print(f"| {row['keep']} | " + " | ".join(f"{row[c]:.2%}" for c in cols) + " |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"run": args.run, "block": args.block, "images": len(y), "base": base, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
