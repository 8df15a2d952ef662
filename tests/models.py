"""Models the tests run on: timm and Hugging Face builders and a hand-written ViT.

All random-init (no weights are downloaded). Each entry is ``name -> (builder, expected facts)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class HandAttention(nn.Module):
    """Separate q/k/v projections and a manual softmax, scale applied after the matmul."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, self.dh).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attn = (q @ k.transpose(-2, -1)) / self.dh**0.5
        y = attn.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = self.attn(self.ln_a(x)) + x
        return x + self.ff(self.ln_b(x))


class HandViT(nn.Module):
    """A plain ViT written from scratch: conv patchify, CLS token, learned positions, CLS head."""

    def __init__(self, img: int = 64, patch: int = 8, dim: int = 96, depth: int = 4, heads: int = 3, classes: int = 10):
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.layers = nn.ModuleList(HandBlock(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patchify(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.fc(self.ln(x)[:, 0])


def timm_model(name: str, **kw):
    import timm

    return timm.create_model(name, pretrained=False, **kw).eval()


def vit_fused_off(**kw):
    m = timm_model("vit_small_patch16_224", **kw)
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


def hf_vit(layers: int = 12, **kw):
    import transformers

    cfg = transformers.ViTConfig(
        num_hidden_layers=layers, hidden_size=192, num_attention_heads=3, intermediate_size=768,
        image_size=224, patch_size=16, num_labels=10, **kw,
    )
    return transformers.ViTForImageClassification(cfg).eval()


def hand_vit(**kw):
    return HandViT(**kw).eval()


# name -> (builder, blocks, prefix tokens, patch tokens, head reader kinds, image size)
ACCEPTANCE = {
    "deit_tiny": (lambda: timm_model("deit_tiny_patch16_224"), 12, 1, 196, ["token"], 224),
    "deit_small_distilled": (lambda: timm_model("deit_small_distilled_patch16_224"), 12, 2, 196, ["token", "token"], 224),
    "vit_small_fused": (lambda: timm_model("vit_small_patch16_224"), 12, 1, 196, ["token"], 224),
    "vit_small_unfused": (lambda: vit_fused_off(), 12, 1, 196, ["token"], 224),
    "dinov2_reg4": (lambda: timm_model("vit_small_patch14_reg4_dinov2", img_size=224), 12, 5, 256, ["token"], 224),
    "vit_qknorm": (lambda: timm_model("vit_small_patch16_224", qk_norm=True), 12, 1, 196, ["token"], 224),
    "vit_base_avgpool": (lambda: timm_model("vit_base_patch16_224", global_pool="avg", class_token=False), 12, 0, 196, ["mean"], 224),
    "hf_vit": (lambda: hf_vit(), 12, 1, 196, ["token"], 224),
    "hand_vit": (lambda: hand_vit(), 4, 1, 64, ["token"], 64),
}


def logits(out):
    """The tensor a model returned (Hugging Face wraps it in a ModelOutput)."""
    return out.logits if hasattr(out, "logits") else out


def run_example(name: str) -> None:
    """Run ``examples/<name>.py``'s ``main()`` (tests read what it prints with capsys)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
