"""The learned policies end to end in an ordinary training loop: A-ViT, AdaViT, DynamicViT and SaiT.

    python examples/learned_policies.py

For each policy: ``prepare_training`` gives a training graph (the policy masked and differentiable, its
losses from ``aux_losses()``), a few optimizer steps run on random images, the trained weights go back
into the original architecture (``model_state_dict()``; AdaViT's and DynamicViT's decision networks in
``policy_state_dict()``) and ``optimize`` emits the inference graph, where the skipped tokens (AdaViT:
and heads and sub-layers) are gone.
SaiT's density is a knob of that graph: set it, no rebuild. (A real recipe, on Fashion-MNIST, is
``tokenopt train``: README, "Training learned policies".)
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import tokenopt


def small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8, num_classes=5)


def train_a_little(policy, steps: int = 2):
    model = small_vit()
    tm = tokenopt.prepare_training(model, policy=policy, example_inputs=(torch.randn(2, 3, 64, 64),))
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-4)
    for step in range(steps):
        if "density" in tm.knobs:  # SaiT: dense and sparse steps alternate
            tm.density = 1.0 if step % 2 == 0 else policy.sparse_density(torch.rand(()).item())
        x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
        loss = F.cross_entropy(tm(x), y)
        losses = tm.aux_losses()  # the policy's own losses of this call, already weighted
        (loss + sum(losses.values(), torch.zeros(()))).backward()
        opt.step()
        opt.zero_grad()
    if hasattr(policy, "after_training"):  # AdaViT: inference gates cut to use what training used
        tm.eval()
        policy.after_training(tm, torch.randn(64, 3, 64, 64))  # (your training images here)
    model.load_state_dict(tm.model_state_dict(), strict=True)  # an ordinary checkpoint of the original model
    return model.eval(), tm.policy_state_dict(), sorted(losses)


def main() -> None:
    x = torch.randn(4, 3, 64, 64)
    policies = (tokenopt.AViT(gamma=5.0, beta=-1.0), tokenopt.AdaViT(), tokenopt.DynamicViT(rho=0.7),
                tokenopt.SaiT(density=0.7))
    for policy in policies:
        model, policy_state, losses = train_a_little(policy)
        gm = tokenopt.optimize(model, policy=policy, example_inputs=(x,), policy_state=policy_state or None)
        counts = {b: c.tolist() for b, c in tokenopt.token_counts(gm, x).items()}
        print(f"{policy.name}: training losses {losses or 'none (task loss only)'}; tokens after each block {counts}")
        for block, used in tokenopt.gate_usage(gm, x).items():  # AdaViT: what each image ran
            print(f"  block {block}: heads run {used['heads'].tolist()}, MLP run {used['mlp'].int().tolist()}")
        if "density" in gm.knobs:
            for density in (1.0, 0.5):
                gm.density = density
                print(f"  density {density}: {tokenopt.token_counts(gm, x)[1].tolist()} tokens after block 1")


if __name__ == "__main__":
    main()
