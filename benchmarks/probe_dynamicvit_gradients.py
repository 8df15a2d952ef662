"""Why DynamicViT's keep ratio drifts in training: the task's gradient on its predictors against the ratio loss's.

    python benchmarks/probe_dynamicvit_gradients.py --run runs/c192/base --rho 0.5 --blocks 2,3

Builds ``tokenopt.prepare_training(model, DynamicViT(rho, blocks))`` from a ``tokenopt train`` run and, on
``--batches`` batches of training images, takes the gradients ``tokenopt train`` takes: the task loss (cross
entropy) plus distillation to the run's own model (KL, the policy's ``distill_weight``), and the keep-ratio
loss at weight 1. It prints, per predictor (one per pruning stage):

- the norm of each loss's gradient on the predictor's parameters, and the ``ratio_weight`` at which the two
  are equal (below it the task decides how many tokens the predictor keeps in training, and the task
  always gains from keeping more: training then keeps more than inference's ``rho ** s``);
- how that task gradient is spread over the tokens: quantiles of ``|dL / dz(keep)|`` per token (``z``: the predictor's logits) and the
  share of the total carried by the largest 1%. The hard Gumbel mask enters every later attention
  (``softmax_with_policy``); for a dropped token whose key dominates a query's row, the derivative of that
  row with respect to its keep weight is ``exp(l_max) / sum over kept exp(l)``, which is huge when the kept
  keys score far below it. A few such tokens then carry almost all of the predictor's task gradient.

Not a benchmark of speed; a measurement to choose ``ratio_weight`` before a fine-tune (docs/RESULTS.md,
Learned policies).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tokenopt.train import distillation


def predictor_gradients(tm, x, y, teacher_logp, distill_weight: float, ratio_weight: float) -> dict[str, dict]:
    """Per predictor: ``task`` and ``ratio`` (weight 1) gradient norms on its parameters, and ``tokens``: the
    per-token gradient of the task loss on the predictor's "keep" logit (``fc3``'s output before ``log_softmax``; ``[B, N]``, minus the "drop" logit's). ``tm``: a ``prepare_training`` module for a
    ``DynamicViT`` policy built with ``ratio_weight`` (divided out)."""
    predictors = {n.rsplit(".", 1)[-1]: m for n, m in tm.named_modules() if type(m).__name__ == "Predictor"}
    if not predictors:
        raise SystemExit("probe_dynamicvit_gradients: the training module has no DynamicViT predictors")
    outputs, handles = {}, []
    for name, m in predictors.items():
        handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out)))
    try:
        logits = tm(x).float()
    finally:
        for h in handles:
            h.remove()
    task = F.cross_entropy(logits, y)
    if teacher_logp is not None:
        task = task + distillation(logits, teacher_logp, distill_weight)
    ratio = tm.aux_losses()["ratio"] / ratio_weight
    result = {}
    for name, m in predictors.items():
        params = list(m.parameters())
        g_task = torch.autograd.grad(task, params + [outputs[name]], retain_graph=True)
        g_ratio = torch.autograd.grad(ratio, params, retain_graph=True, allow_unused=True)
        norm = lambda gs: float(sum((g.float() ** 2).sum() for g in gs if g is not None)) ** 0.5
        g, logp = g_task[-1].detach(), outputs[name].detach()
        z = g - logp.exp() * g.sum(-1, keepdim=True)  # through log_softmax: the gradient on fc3's (keep, drop) outputs
        result[name] = {"task": norm(g_task[:-1]), "ratio": norm(g_ratio), "tokens": z[..., 0]}
    return result


def spread(tokens: torch.Tensor) -> dict[str, float]:
    """Quantiles of ``|g|`` over the tokens and the share of ``sum |g|`` the largest 1% carry."""
    a = tokens.abs().flatten().sort().values
    q = lambda p: float(a[int(p * (len(a) - 1))])
    top = max(1, len(a) // 100)
    return {"median": q(0.5), "p99": q(0.99), "max": float(a[-1]),
            "top1%": float(a[-top:].sum() / a.sum().clamp_min(1e-30))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/c192/base", help="a tokenopt train run (its model.pt)")
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--blocks", default="2,3", help="prune after these blocks (0-based)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args(argv)
    import tokenopt
    from tokenopt.train import _data, load_run

    _, model, _ = load_run(args.run)
    policy = tokenopt.DynamicViT(rho=args.rho, blocks=tuple(int(b) for b in args.blocks.split(",")))
    x_all, y_all = _data("train", args.batch * args.batches)
    tm = tokenopt.prepare_training(model, policy, example_inputs=(x_all[:2],))
    torch.manual_seed(0)
    print(f"DynamicViT rho {args.rho} after blocks {args.blocks}, from {args.run}, {args.batches} batches of {args.batch}")
    print("| batch | predictor | task grad norm | ratio grad norm (weight 1) | equal at ratio_weight | "
          "per-token |dL/dz keep|: median | p99 | max | largest 1% carry |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in range(args.batches):
        x, y = x_all[i * args.batch:(i + 1) * args.batch], y_all[i * args.batch:(i + 1) * args.batch]
        with torch.no_grad():
            teacher = F.log_softmax(model(x).float(), -1)
        for name, r in predictor_gradients(tm, x, y, teacher, policy.distill_weight, policy.ratio_weight).items():
            s = spread(r["tokens"])
            print(f"| {i} | {name} | {r['task']:.3g} | {r['ratio']:.3g} | {r['task'] / max(r['ratio'], 1e-30):.3g} | "
                  f"{s['median']:.2g} | {s['p99']:.2g} | {s['max']:.3g} | {s['top1%']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
