"""Each rewritten model against the eager reference of the same algorithm (tests/reference_models.py)."""

import math

import pytest
import torch

import tokenopt
from tests.models import hf_vit, logits, timm_model, vit_fused_off
from tests.reference_models import Policy, hf_forward, timm_forward

MODELS = {
    "deit_tiny": (lambda: timm_model("deit_tiny_patch16_224"), timm_forward, 1),
    "deit_small_distilled": (lambda: timm_model("deit_small_distilled_patch16_224"), timm_forward, 2),
    "dinov2_reg4": (lambda: timm_model("vit_small_patch14_reg4_dinov2", img_size=224), timm_forward, 5),
    "vit_small_unfused": (lambda: vit_fused_off(), timm_forward, 1),
    "hf_vit": (lambda: hf_vit(), hf_forward, 1),
}
POLICIES = {
    "ats": (dict(max_tokens=60, min_tokens=8), Policy("ats", tuple(range(3, 12)), max_tokens=60, min_tokens=8)),
    "topk": (dict(keep_rate=0.7), Policy("topk", (3, 6, 9), keep_rate=0.7)),
    "topk_fuse": (dict(keep_rate=0.5, fuse=True, blocks=(2, 5)), Policy("topk", (2, 5), keep_rate=0.5, fuse=True)),
    "tome": (dict(r=13), Policy("tome", tuple(range(12)), r=13)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    build, forward, prefix = MODELS[request.param]
    return request.param, build(), forward, prefix


def _policy_name(key):
    return key.split("_")[0]


@pytest.mark.parametrize("policy_key", sorted(POLICIES))
def test_rewritten_model_matches_eager_reference(model_case, policy_key):
    name, model, forward, prefix = model_case
    options, pol = POLICIES[policy_key]
    gm = tokenopt.optimize(model, policy=_policy_name(policy_key), **options)
    x = torch.randn(3, 3, 224, 224)  # batch 3: not the example's batch of 2
    with torch.no_grad():
        out = logits(gm(x))
        expected, ref_counts = forward(model, x, pol)
    torch.testing.assert_close(out, expected)

    counts = tokenopt.token_counts(gm, x)
    assert sorted(counts) == list(range(12))
    for block, c in counts.items():
        assert c.tolist() == ref_counts[block].tolist(), f"block {block}"

    n = prefix + (256 if name == "dinov2_reg4" else 196)
    if pol.kind == "topk":  # static counts, computed here from EViT's rule
        tokens = n
        for block in range(12):
            if block in pol.blocks:
                patches = tokens - prefix
                tokens = prefix + math.ceil(pol.keep_rate * patches) + (1 if pol.fuse else 0)
            assert counts[block].tolist() == [tokens] * 3
    if pol.kind == "tome":
        tokens = n
        for block in range(12):
            tokens -= min(pol.r, (tokens - prefix + 1) // 2)
            assert counts[block].tolist() == [tokens] * 3
    if pol.kind == "ats":
        assert all(counts[b].tolist() == [n] * 3 for b in range(3))
        for b in range(3, 12):
            assert ((counts[b] >= prefix + 8) & (counts[b] <= prefix + 60)).all()
        # per-image adaptive: not every image keeps the same number
        assert len({tuple(counts[b].tolist()) for b in range(3, 12)}) > 1


@pytest.mark.parametrize("policy, options", [("topk", dict(keep_rate=1.0)), ("tome", dict(r=0)), ("ats", dict(blocks=()))])
def test_reduction_switched_off_equals_original(model_case, policy, options):
    _name, model, _forward, _prefix = model_case
    gm = tokenopt.optimize(model, policy=policy, **options)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(logits(gm(x)), logits(model(x)))
