"""Coverage survey: every policy on ViT variants from timm, Hugging Face, vit-pytorch and hand-written code.

Each model is built small with random weights (no downloads) and optimized with each training-free
policy at its defaults. A cell says what a user would get:

* ``reduced 0.62``: the policy reduced tokens; the number is the FLOPs of one call of the optimized
  graph over the model's (``tokenopt.flops.count_flops``, counted while each runs on the same batch);
* ``equal``: ``policy="none"`` returned a graph equal to the model (max |diff| <= 1e-4);
* ``alone``: ``optimize`` ran but reduced nothing, with a warning saying why (blocks not recognised,
  no block to act on, attention left alone);
* ``refused``: ``optimize`` raised; the message is listed under the table.

A reduced cell is also checked to return the model's output shape with finite values; a ``none``
cell that differs from the model is reported as ``WRONG``. One JSON record per cell goes to ``--json``.

    python benchmarks/survey_models.py                       # all variants, ~30 min on this CPU
    python benchmarks/survey_models.py --only timm/ --policies none tome
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenopt
from tokenopt.flops import count_flops

POLICIES = ("none", "tome", "pitome", "topk", "ats")
# --learned: the learned policies at their seeded initialisation, with options that make an untrained
# policy act (fresh A-ViT scores halt nothing at beta=30; fresh AdaViT gates start near 0.95, open).
LEARNED = {"avit": {"beta": 0.0}, "dynamicvit": {}, "sait": {}, "adavit": {"threshold": 0.96}}


@dataclass
class Variant:
    name: str  # "<source>/<model>"
    note: str  # what is particular about it
    build: Callable[[], tuple[nn.Module, torch.Tensor]]
    options: dict = field(default_factory=dict)  # passed to every optimize call (dense=True, ...)


# -- timm ----------------------------------------------------------------------------------------------


def _timm(arch: str, size: int, **kw):
    def build():
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=10, **kw), torch.randn(2, 3, size, size)

    return build


SMALL = dict(embed_dim=96, num_heads=3, depth=4)
TIMM = [
    Variant("timm/deit_tiny", "plain ViT, CLS head", _timm("deit_tiny_patch16_224", 64, depth=4, img_size=64)),
    Variant("timm/deit_tiny_distilled", "CLS + distillation token", _timm("deit_tiny_distilled_patch16_224", 64, depth=4, img_size=64)),
    Variant("timm/vit_reg4_dinov2", "4 register tokens, LayerScale", _timm("vit_small_patch14_reg4_dinov2", 56, img_size=56, **SMALL)),
    Variant("timm/vit_avgpool", "no CLS, mean-pooled head", _timm("vit_tiny_patch16_224", 64, img_size=64, depth=4, class_token=False, global_pool="avg")),
    Variant("timm/vit_map", "attention-pooling (MAP) head", _timm("vit_tiny_patch16_224", 64, img_size=64, depth=4, class_token=False, global_pool="map")),
    Variant("timm/vit_qknorm", "q/k LayerNorm", _timm("vit_tiny_patch16_224", 64, img_size=64, depth=4, qk_norm=True)),
    Variant("timm/vit_unfused", "manual attention (fused_attn off)", lambda: _unfused(_timm("vit_tiny_patch16_224", 64, img_size=64, depth=4))),
    Variant("timm/deit3", "LayerScale, no positional CLS", _timm("deit3_small_patch16_224", 64, img_size=64, **SMALL)),
    Variant("timm/vit_clip", "CLIP-style pre-norm, quick GELU", _timm("vit_base_patch16_clip_224", 64, img_size=64, **SMALL)),
    Variant("timm/flexivit", "FlexiViT", _timm("flexivit_small", 90, img_size=90, **SMALL)),
    Variant("timm/vit_relpos", "relative-position bias (param table)", _timm("vit_relpos_small_patch16_224", 64, img_size=64, **SMALL)),
    Variant("timm/vit_parallel", "parallel blocks (x + attn + mlp)", _timm("vit_small_patch16_18x2_224", 64, img_size=64, **SMALL)),
    Variant("timm/beit", "relative-position bias per block", _timm("beit_base_patch16_224", 64, img_size=64, **SMALL)),
    Variant("timm/eva02", "rotary positions, SwiGLU", _timm("eva02_tiny_patch14_224", 56, img_size=56, depth=4)),
    Variant("timm/cait", "talking heads + class-attention blocks", _timm("cait_xxs24_224", 64, img_size=64, depth=4)),
    Variant("timm/xcit", "channel attention (XCA)", _timm("xcit_nano_12_p16_224", 64, img_size=64, depth=4)),
    Variant("timm/convit", "gated positional attention", _timm("convit_tiny", 64, img_size=64, depth=4, local_up_to_layer=2)),
    Variant("timm/pit", "pooling between stages", _timm("pit_ti_224", 64, img_size=64)),
    Variant("timm/swin", "windows over [B, H, W, C]", _timm("swin_tiny_patch4_window7_224", 112, img_size=112, depths=(1, 1, 1, 1))),
    Variant("timm/samvit", "windowed + global attention, [B, H, W, C]", _timm(
        "samvit_base_patch16", 64, img_size=64, embed_dim=64, num_heads=2, depth=2, global_attn_indexes=(1,), window_size=2)),
    Variant("timm/volo", "outlooker + class attention", _timm("volo_d1_224", 64, img_size=64)),
    Variant("timm/crossvit", "two branches, cross-attention", _timm("crossvit_tiny_240", 240)),
    Variant("timm/mvitv2", "pooled attention stages", _timm("mvitv2_tiny", 64, img_size=64)),
    Variant("timm/pvt_v2", "spatial-reduction attention", _timm("pvt_v2_b0", 64)),
    Variant("timm/levit", "conv-BN attention, attention bias", _timm("levit_128s", 64, img_size=64)),
]


def _unfused(build):
    model, x = build()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model, x


# -- Hugging Face transformers ---------------------------------------------------------------------------

HF_SMALL = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192, image_size=64,
                patch_size=16)


def _hf(model_cls: str, config_cls: str, size: int = 64, small: bool = True, **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config_cls)(**{**(HF_SMALL if small else {}), "image_size": size, **kw})
        return getattr(transformers, model_cls)(cfg), torch.randn(2, 3, size, size)

    return build


HF = [
    Variant("hf/vit", "ViTForImageClassification", _hf("ViTForImageClassification", "ViTConfig")),
    Variant("hf/vit_eager", "eager attention", _hf("ViTForImageClassification", "ViTConfig", attn_implementation="eager")),
    Variant("hf/deit_teacher", "CLS + distillation heads", _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig")),
    Variant("hf/dinov2", "Dinov2Model: outputs every token (dense=True)",
            _hf("Dinov2Model", "Dinov2Config", size=56, patch_size=14), {"dense": True}),
    Variant("hf/dinov2_cls", "Dinov2ForImageClassification: CLS + mean of patches",
            _hf("Dinov2ForImageClassification", "Dinov2Config", size=56, patch_size=14)),
    Variant("hf/dinov2_registers", "CLS and registers cat in two steps", _hf(
        "Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig", size=56, patch_size=14,
        num_register_tokens=4)),
    Variant("hf/beit", "relative-position bias, mean-pooled head",
            _hf("BeitForImageClassification", "BeitConfig", use_relative_position_bias=True)),
    Variant("hf/clip_vision", "CLIPVisionModel: outputs every token (dense=True)",
            _hf("CLIPVisionModel", "CLIPVisionConfig"), {"dense": True}),
    Variant("hf/siglip_vision", "SigLIP: no CLS, attention-pooling head, outputs every token (dense=True)",
            _hf("SiglipVisionModel", "SiglipVisionConfig"), {"dense": True}),
    Variant("hf/swin", "Swin windows", _hf("SwinForImageClassification", "SwinConfig", size=64, small=False,
                                         patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 2], window_size=4)),
    Variant("hf/yolos", "detection tokens after the patches", _hf("YolosForObjectDetection", "YolosConfig",
                                                                   image_size=[64, 64], num_detection_tokens=5)),
]


# -- vit-pytorch -----------------------------------------------------------------------------------------


def _lucid(module: str, cls: str, size: int = 64, **kw):
    def build():
        import importlib

        model = getattr(importlib.import_module(f"vit_pytorch.{module}"), cls)(**kw)
        return model, torch.randn(2, 3, size, size)

    return build


LUCID_SMALL = dict(image_size=64, patch_size=16, num_classes=10, dim=96, depth=4, heads=3, mlp_dim=192)
LUCID = [
    Variant("vit-pytorch/vit", "einops ViT, CLS pool", _lucid("vit", "ViT", **LUCID_SMALL)),
    Variant("vit-pytorch/vit_mean", "einops ViT, mean pool", _lucid("vit", "ViT", pool="mean", **LUCID_SMALL)),
    Variant("vit-pytorch/simple_vit", "no CLS, sin-cos positions", _lucid("simple_vit", "SimpleViT", **LUCID_SMALL)),
    Variant("vit-pytorch/cait", "talking heads + class attention", _lucid("cait", "CaiT", cls_depth=1, **LUCID_SMALL)),
    Variant("vit-pytorch/deepvit", "re-attention (heads mixed after softmax)", _lucid("deepvit", "DeepViT", **LUCID_SMALL)),
    Variant("vit-pytorch/small_dataset", "shifted-patch tokens, learned temperature, diagonal mask",
            _lucid("vit_for_small_dataset", "ViT", **LUCID_SMALL)),
]


# -- hand-written ----------------------------------------------------------------------------------------

DIM, HEADS = 96, 3


class _Attn(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form, self.dh = form, DIM // HEADS
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        if form in ("mha", "mha_weights"):
            self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        if form == "talking_heads":
            self.pre, self.post = nn.Linear(HEADS, HEADS), nn.Linear(HEADS, HEADS)

    def forward(self, x):
        if self.form in ("mha", "mha_weights"):
            return self.mha(x, x, x, need_weights=self.form == "mha_weights")[0]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        if self.form == "einsum":
            a = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(self.dh ** -0.5).softmax(-1)
            o = torch.einsum("bhnm,bhmd->bhnd", a, v)
        elif self.form == "talking_heads":
            a = self.pre((q @ k.transpose(-2, -1) * self.dh ** -0.5).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            o = self.post(a.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    def __init__(self, form: str, post_norm: bool):
        super().__init__()
        self.post_norm = post_norm
        self.attn = _Attn(form)
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        if self.post_norm:  # the original Transformer / BERT order
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.mlp(x))
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class HandViT(nn.Module):
    def __init__(self, form: str = "sdpa", post_norm: bool = False, pool: str = "cls", depth: int = 4,
                 len_batch: bool = False):
        super().__init__()
        self.pool, self.len_batch = pool, len_batch
        self.patch = nn.Conv2d(3, DIM, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, 65, DIM) * 0.1)
        self.blocks = nn.Sequential(*[_Block(form, post_norm) for _ in range(depth)])
        self.head = nn.Linear(DIM, 10)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        batch = len(x) if self.len_batch else x.shape[0]  # len(x): export fixes the batch size
        x = torch.cat([self.cls.expand(batch, -1, -1), x], 1) + self.pos
        x = self.blocks(x)
        return self.head(x[:, 0] if self.pool == "cls" else x[:, 1:].mean(1))


def _hand(**kw):
    return lambda: (HandViT(**kw), torch.randn(2, 3, 64, 64))


HAND = [
    Variant("hand/sdpa", "F.scaled_dot_product_attention", _hand()),
    Variant("hand/einsum", "attention by einsum", _hand(form="einsum")),
    Variant("hand/mha", "nn.MultiheadAttention, need_weights=False", _hand(form="mha")),
    Variant("hand/mha_weights", "nn.MultiheadAttention, need_weights=True", _hand(form="mha_weights")),
    Variant("hand/talking_heads", "heads mixed around the softmax", _hand(form="talking_heads")),
    Variant("hand/post_norm", "post-norm blocks", _hand(post_norm=True)),
    Variant("hand/mean_pool", "mean over patch tokens", _hand(pool="mean")),
    Variant("hand/len_batch", "len(x) for the batch size (export fixes it)", _hand(len_batch=True)),
]

VARIANTS = TIMM + HF + LUCID + HAND


# -- running ---------------------------------------------------------------------------------------------


def _first(out):
    """The first tensor of a model output (a tensor, tuple, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        t = _first(o)
        if t is not None:
            return t
    return None


def _short(message: str, width: int = 150) -> str:
    message = re.sub(r"\s+", " ", message).strip()
    return message if len(message) <= width else message[: width - 3] + "..."


def run_cell(model: nn.Module, x: torch.Tensor, policy: str, base_flops: int, ref: torch.Tensor,
             options: Optional[dict] = None) -> dict:
    options = options or {}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gm = tokenopt.optimize(model, policy=policy, example_inputs=(x,), **options)
        except Exception as e:  # noqa: BLE001  (the survey reports every refusal)
            return {"outcome": "refused", "error": type(e).__name__, "message": str(e),
                    "seconds": time.perf_counter() - started}
    said = [str(w.message) for w in caught
            if issubclass(w.category, UserWarning) and ("tokenopt" in w.category.__module__ or "optimize" in str(w.message)
                                                         or "tokenopt" in str(w.filename))]
    with torch.no_grad():
        out = _first(gm(x))
    record = {"seconds": time.perf_counter() - started, "warnings": said}
    if policy == "none":
        diff = (out.float() - ref.float()).abs().max().item()
        record.update(outcome="equal" if diff <= 1e-4 else "WRONG", max_abs_diff=diff)
        return record
    counts = tokenopt.token_counts(gm, x)
    with torch.no_grad():
        flops = count_flops(gm, x)
    ok = out.shape == ref.shape and bool(torch.isfinite(out).all())
    reduced = flops < base_flops * 0.995
    record.update(flops_ratio=flops / base_flops, blocks=len(counts),
                  outcome=("reduced" if reduced else "alone") if ok else "WRONG")
    if not ok:
        record["message"] = f"output shape {tuple(out.shape)} (model {tuple(ref.shape)}) or non-finite values"
    return record


def _finite_grads(tm: nn.Module) -> tuple[int, int]:
    """(parameters given a gradient, of which non-finite)."""
    grads = [p.grad for p in tm.parameters() if p.grad is not None]
    return len(grads), sum(1 for g in grads if not bool(torch.isfinite(g).all()))


def run_learned_cell(model: nn.Module, x: torch.Tensor, policy: str, base_flops: int, ref: torch.Tensor,
                     options: Optional[dict] = None) -> dict:
    """A learned policy on one variant, its three forms checked against each other:

    1. ``prepare_training`` (masked, differentiable): one training step's forward and backward, the
       task loss plus the policy's losses; every gradient must be finite and the policy's modules
       (where it has any) must get one;
    2. the same module in ``eval()``: the inference decisions, still masked;
    3. ``optimize`` with the module's policy weights: the inference graph, where the skipped work is
       gone. Its output must equal (2) (max |diff| <= 1e-3, relative to the output's scale), and its
       FLOPs are counted while it runs.
    """
    options = {**(options or {}), **LEARNED[policy]}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage = "prepare_training"
        try:
            tm = tokenopt.prepare_training(model, policy=policy, example_inputs=(x,), **options)
            stage = "optimize"
            gm = tokenopt.optimize(model, policy=policy, example_inputs=(x,),
                                   policy_state=tm.policy_state_dict(), **options)
        except Exception as e:  # noqa: BLE001  (the survey reports every refusal)
            return {"outcome": "refused", "error": type(e).__name__, "message": f"{stage}: {e}",
                    "seconds": time.perf_counter() - started}
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
            and "no trained weights" not in str(w.message)  # expected here: the policy is untrained
            and ("tokenopt" in w.category.__module__ or "tokenopt" in str(w.filename))]
    record = {"warnings": said}

    tm.train()
    out = _first(tm(x))
    loss = out.float().square().mean() + sum(tm.aux_losses().values(), torch.zeros(()))
    loss.backward()
    given, bad = _finite_grads(tm)
    policy_params = [p for n, p in tm.named_parameters() if n.startswith("tokenopt_")]
    if bad or not torch.isfinite(loss) or (policy_params and all(p.grad is None for p in policy_params)):
        record.update(outcome="WRONG", message=f"training step: loss {loss.item():.4g}, {bad} of {given} "
                      f"gradients non-finite, policy modules given a gradient: "
                      f"{sum(p.grad is not None for p in policy_params)} of {len(policy_params)}")
        return record

    tm.eval()
    with torch.no_grad():
        masked = _first(tm(x)).float()
        packed = _first(gm(x)).float()
        flops = count_flops(gm, x)
    diff = (packed - masked).abs().max().item()
    scale = max(1.0, masked.abs().max().item())
    record.update(seconds=time.perf_counter() - started, flops_ratio=flops / base_flops,
                  max_abs_diff_vs_masked=diff, blocks=len(tokenopt.token_counts(gm, x)))
    if packed.shape != ref.shape or not bool(torch.isfinite(packed).all()) or diff > 1e-3 * scale:
        record.update(outcome="WRONG", message=f"inference graph: shape {tuple(packed.shape)} (model "
                      f"{tuple(ref.shape)}), max |diff| to the masked eval {diff:.3g}")
        return record
    record["outcome"] = "reduced" if flops < base_flops * 0.995 else "alone"
    return record


def cell_text(r: dict) -> str:
    if r["outcome"] == "reduced":
        return f"reduced {r['flops_ratio']:.2f}" + (" (warns)" if r.get("warnings") else "")
    if r["outcome"] == "equal":
        return "equal" + (" (warns)" if r.get("warnings") else "")
    if r["outcome"] == "alone":
        return "alone, warns" if r.get("warnings") else "alone, SILENT"
    return r["outcome"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=None,
                    help=f"default: {' '.join(POLICIES)}; with --learned: {' '.join(LEARNED)}")
    ap.add_argument("--learned", action="store_true",
                    help="survey the learned policies: training step, masked eval and inference graph "
                         "checked against each other (run_learned_cell)")
    ap.add_argument("--only", nargs="*", default=[], help="name prefixes of the variants to run")
    ap.add_argument("--json", default=None, help="default: out/survey.json (--learned: out/survey_learned.json)")
    args = ap.parse_args(argv)
    if args.policies is None:
        args.policies = list(LEARNED if args.learned else POLICIES)
    elif args.learned and set(args.policies) - set(LEARNED):
        ap.error(f"--learned surveys {', '.join(LEARNED)}; got {', '.join(args.policies)}")
    cell = run_learned_cell if args.learned else run_cell
    args.json = args.json or ("out/survey_learned.json" if args.learned else "out/survey.json")
    from rich.progress import Progress

    chosen = [v for v in VARIANTS if not args.only or any(v.name.startswith(p) for p in args.only)]
    results = {}
    torch.manual_seed(0)
    with Progress(transient=True) as bar:
        task = bar.add_task("survey", total=len(chosen) * len(args.policies))
        for v in chosen:
            bar.update(task, description=v.name)
            try:
                model, x = v.build()
                model.eval()
                with torch.no_grad():
                    ref = _first(model(x))
                    base = count_flops(model, x)
            except Exception as e:  # noqa: BLE001
                results[v.name] = {"note": v.note, "build_error": f"{type(e).__name__}: {_short(str(e))}"}
                bar.advance(task, len(args.policies))
                continue
            results[v.name] = {"note": v.note + (f" [{', '.join(f'{k}={o}' for k, o in v.options.items())}]"
                                                 if v.options else ""), "cells": {}}
            for policy in args.policies:
                try:
                    results[v.name]["cells"][policy] = cell(model, x, policy, base, ref, v.options)
                except Exception as e:  # noqa: BLE001  (a crash after optimize returned is a defect: shown)
                    results[v.name]["cells"][policy] = {"outcome": "CRASH", "message": traceback.format_exc(limit=3)}
                    print(f"{v.name} {policy}: {type(e).__name__}: {e}", file=sys.stderr)
                bar.advance(task)

    lines = ["| model | what | " + " | ".join(args.policies) + " |", "|---|---|" + "---|" * len(args.policies)]
    notes = []
    for name, r in results.items():
        if "build_error" in r:
            lines.append(f"| {name} | {r['note']} | " + " | ".join(["(not built)"] * len(args.policies)) + " |")
            notes.append(f"- {name}: not built: {r['build_error']}")
            continue
        lines.append(f"| {name} | {r['note']} | " + " | ".join(cell_text(r["cells"][p]) for p in args.policies) + " |")
        seen = {}
        for p in args.policies:
            c = r["cells"][p]
            text = c.get("message") or (c.get("warnings") or [""])[0]
            if c["outcome"] in ("refused", "WRONG", "CRASH", "alone") or (c["outcome"] == "equal" and text):
                seen.setdefault(_short(text, 400), []).append(p)
        for text, ps in seen.items():
            notes.append(f"- {name} ({', '.join(ps)}): {text}")
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    tally = {}
    for r in results.values():
        for p, c in r.get("cells", {}).items():
            tally.setdefault(p, {}).setdefault(c["outcome"], 0)
            tally[p][c["outcome"]] += 1
    print()
    for p, t in tally.items():
        print(f"{p}: " + ", ".join(f"{k} {n}" for k, n in sorted(t.items())))
    if args.json:
        import os

        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    bad = sum(1 for r in results.values() for c in r.get("cells", {}).values() if c["outcome"] in ("WRONG", "CRASH"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
