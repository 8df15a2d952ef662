"""A dense head on a token-reduced ViT: per-patch predictions (segmentation style) from the full grid.

    python examples/dense_head.py

The backbone returns every token ``[B, 197, C]``; the head lays the 196 patch tokens out as a 14x14
grid and predicts a class per patch with a 1x1 convolution. ``dense=True`` gives the head the full grid
back after ToMe merged tokens (a merged token's features go to every patch it absorbed), so the head
runs unchanged. Prints how far the reduced model's per-patch predictions are from the original's.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

import tokenopt


class Segmenter(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.backbone = timm.create_model("deit_tiny_patch16_224", num_classes=0, global_pool="")
        self.head = nn.Conv2d(self.backbone.embed_dim, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(x)[:, 1:]  # [B, 196, C] patch tokens
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, 14, 14)
        return self.head(grid)  # [B, classes, 14, 14]


def main() -> None:
    torch.manual_seed(0)
    model = Segmenter().eval()
    x = torch.randn(4, 3, 224, 224)
    gm = tokenopt.optimize(model, policy="tome", r=8, dense=True, example_inputs=(x[:2],))
    with torch.no_grad():
        want, got = model(x), gm(x)
    agree = (want.argmax(1) == got.argmax(1)).float().mean().item()
    print(f"output {tuple(got.shape)}; per-patch class agreement with the original: {agree:.1%}; "
          f"tokens per block: {[int(c[0]) for c in tokenopt.token_counts(gm, x).values()]}")


if __name__ == "__main__":
    main()
