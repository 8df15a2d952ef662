"""A whole optimized DeiT-Tiny with its token ops fused into Triton kernels, run on the CPU through
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), against the reference path."""

import pytest
import torch

import tokenopt
from tests.models import timm_model

POLICIES = {
    "ats ragged": {"policy": "ats"},
    "topk + fused token": {"policy": "topk", "fuse": True},
    "tome": {"policy": "tome", "r": 8},
}


@pytest.fixture(scope="module")
def deit():
    return timm_model("deit_tiny_patch16_224")


@pytest.mark.parametrize("name", POLICIES)
def test_fused_deit_tiny_matches_the_reference_path(deit, name):
    options = POLICIES[name]
    example = (torch.randn(2, 3, 224, 224),)
    reference = tokenopt.optimize(deit, example_inputs=example, kernels="reference", **options)
    fused = tokenopt.optimize(deit, example_inputs=example, kernels="triton", **options)
    fused_ops = fused.meta["tokenopt.counters"]["fuse_kernels"]["fused"]
    assert fused_ops and sum(fused_ops.values()) >= 3, fused_ops  # a chain per reducing block at least
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        want, got = reference(x), fused(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # per-block, per-image token counts on the example (optimize records them from a run of each graph)
    counts_ref = reference.meta["tokenopt.example_token_counts"]
    counts_fused = fused.meta["tokenopt.example_token_counts"]
    assert counts_ref.keys() == counts_fused.keys() and len(counts_ref) == 12
    for block in counts_ref:
        assert torch.equal(counts_ref[block], counts_fused[block]), block
