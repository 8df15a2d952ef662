"""Where can DynamicViT prune this model? A training-free look at its operating points before a fine-tune.

    python benchmarks/probe_operating_points.py --run runs/c192/base --points "0.75@1,2,3 0.5@2,3 0.4@2"

For each point ``rho@blocks``: after each chosen block ``b`` (the ``s``-th, 0-based block indices) every image
keeps the ``int(patches * rho ** s)`` patch tokens with the highest head-averaged CLS attention of block
``b``: DynamicViT's inference counts at DynamicViT's places (``tokenopt.DynamicViT(rho, blocks)``), with the
CLS attention standing in for predictors not yet trained. Columns: that accuracy on the first ``--images``
test images (against the dense model's), the tokens entering each block, and the FLOPs ratio of
``DynamicViT(rho, blocks)``'s inference graph to the model's (counted while it runs; predictors included,
which the attention proxy does not need). A point where even this proxy loses little is one a short
fine-tune can hold; the predictors must learn a ranking at least this good.

The proxy runs the model's own blocks eagerly (a timm ViT, as ``tokenopt train`` builds), so it checks
itself: its token counts must be the DynamicViT graph's, or it exits.
"""

from __future__ import annotations

import argparse

import torch


def cls_attention(block, h: torch.Tensor) -> torch.Tensor:
    """``[B, N - 1]``: the head-averaged attention of CLS to each patch in a timm ``Block`` on input ``h``."""
    attn = block.attn
    b, n, c = h.shape
    qkv = attn.qkv(block.norm1(h)).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q[:, :, :1] @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]


@torch.no_grad()
def pruned_logits(model, x: torch.Tensor, rho: float, blocks: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """The model's logits with the CLS-attention proxy of ``DynamicViT(rho, blocks)``, and the tokens entering
    each block."""
    if getattr(model, "num_prefix_tokens", 1) != 1:
        raise SystemExit("probe_operating_points: the proxy expects one prefix token (CLS); this model has "
                         f"{model.num_prefix_tokens}")
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    patches, counts, stage = h.shape[1] - 1, [], 0
    for index, block in enumerate(model.blocks):
        counts.append(h.shape[1])
        before, h = h, block(h)
        if index in blocks:
            stage += 1
            keep = max(1, int(patches * rho ** stage))
            if keep < h.shape[1] - 1:
                idx = cls_attention(block, before).topk(keep, dim=1).indices.sort(dim=1).values + 1
                h = torch.cat([h[:, :1], h.gather(1, idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))], dim=1)
    return model.forward_head(model.norm(h)), counts


def parse_points(text: str) -> list[tuple[float, tuple[int, ...]]]:
    points = []
    for item in text.split():
        rho, _, blocks = item.partition("@")
        try:
            points.append((float(rho), tuple(int(b) for b in blocks.split(","))))
        except ValueError:
            raise SystemExit(f"--points {item!r}: expected RHO@BLOCK,BLOCK,..., e.g. 0.5@2,3") from None
    return points


def main(argv=None) -> int:
    import tokenopt
    from tokenopt.flops import count_flops
    from tokenopt.train import _data, load_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/c192/base", help="a `tokenopt train` run (its model.pt and log.json)")
    ap.add_argument("--points", default="0.75@1,2,3 0.7@1,2,3 0.5@2,3 0.55@2,3 0.6@2,3,4 0.4@2",
                    help="space-separated RHO@BLOCKS (0-based blocks, comma-separated)")
    ap.add_argument("--images", type=int, default=1000, help="first N test images")
    ap.add_argument("--batch", type=int, default=250)
    args = ap.parse_args(argv)
    points = parse_points(args.points)
    _, model, _ = load_run(args.run)
    x, y = _data("test", args.images)

    def accuracy(rho, blocks):
        hits = 0
        for i in range(0, len(y), args.batch):
            logits, counts = pruned_logits(model, x[i:i + args.batch], rho, blocks)
            hits += int((logits.argmax(1) == y[i:i + args.batch]).sum())
        return hits / len(y), counts

    example = x[:64]
    base_flops = count_flops(model, example)
    dense, _ = accuracy(1.0, ())
    print(f"dense: {dense:.2%} on the first {len(y)} test images")
    print("| rho | after blocks | accuracy | drop (points) | tokens entering each block | FLOPs ratio (DynamicViT) |")
    print("|---|---|---|---|---|---|")
    for rho, blocks in points:
        gm = tokenopt.optimize(model, policy=tokenopt.DynamicViT(rho=rho, blocks=blocks), example_inputs=(example,))
        acc, counts = accuracy(rho, blocks)
        graph_counts = [int(c.float().mean()) for c in tokenopt.token_counts(gm, example).values()]
        if graph_counts != counts:
            raise SystemExit(f"rho {rho} after {blocks}: the proxy ran {counts} tokens, DynamicViT's graph {graph_counts}")
        ratio = count_flops(gm, example) / base_flops
        print(f"| {rho} | {', '.join(map(str, blocks))} | {acc:.2%} | {100 * (dense - acc):.2f} | "
              f"{' '.join(map(str, counts))} | {ratio:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
