"""Compile every policy's optimized graph with ``torch.compile(fullgraph=True)`` and compare it with the graph.

Run in a fresh process by tests/test_release.py with ``CI=true`` and empty inductor and Triton cache folders,
the way a stranger's CI runs it (inductor refuses a fallback for an op that has a *global* decomposition when
``CI`` is set, and a warm cache skips the lowering that checks it). Each compiled graph runs at two batch
sizes, with ``torch.compile``'s dynamic setting chosen per policy (``tome@dynamic``, ``ats padded@static``).
One process for all: the first compile runs on empty caches, later ones reuse the kernels they share.
Prints one ``ok <policy>`` line each.
"""

import sys
import warnings

import timm
import torch

import tokenopt


def cases():
    # float64: inductor's fused kernels round differently from eager ATen; in float32 a score can cross
    # one of ATS's sampling points, changing which token is kept
    return {
        "none": dict(policy="none"),
        "topk": dict(policy="topk", blocks=(1,), fuse=True),
        "tome": dict(policy="tome", r=6),
        "pitome": dict(policy="pitome", r=6),
        "ats packed": dict(policy="ats", blocks=(1, 2)),
        "ats padded": dict(policy="ats", blocks=(1, 2), mode="padded"),
        "topk+tome": dict(policy=[tokenopt.TopK(blocks=(1,)), tokenopt.ToMe(r=4, blocks=(2,))]),
        "sait": dict(policy=tokenopt.SaiT(density=0.5)),
        "dynamicvit": dict(policy="dynamicvit"),
        "avit": dict(policy="avit"),
        "adavit": dict(policy="adavit"),
    }


SETTINGS = {"": None, "dynamic": True, "static": False}


def main(names) -> int:
    """``names``: policies of :func:`cases`, each optionally ``@dynamic`` or ``@static``
    (``torch.compile(dynamic=True / False)``; without a suffix: torch's own choice, a static graph first and a
    dynamic one at the second batch size)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=64, patch_size=8, num_classes=5)
    model = model.eval().double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    table = cases()
    for item in names or table:
        name, _, setting = item.partition("@")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untrained predictors of the learned policies
            gm = tokenopt.optimize(model, example_inputs=(x,), **table[name])
        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, dynamic=SETTINGS[setting])
        with torch.no_grad():
            # the first size, then another (the dynamic graph, or torch's default recompiling as dynamic);
            # dynamic=False would only compile the same static graph again for the second size
            for batch in (3,) if setting == "static" else (3, 5):
                xb = torch.randn(batch, *x.shape[1:], dtype=x.dtype)
                torch.testing.assert_close(compiled(xb), gm(xb), atol=1e-6, rtol=1e-6)
        print("ok", item, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
