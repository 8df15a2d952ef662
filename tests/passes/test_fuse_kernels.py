"""fuse_kernels: which reference chains become which tokenopt custom ops, and that nothing else changes.

The numerics of a fused graph (Triton under the interpreter) against the reference graph are in
tests/kernels/test_fused_model.py; here only the rewrite itself.
"""

import pytest
import torch

import tokenopt
from tests.models import timm_model
from tokenopt.passes.fuse_kernels import FuseKernels, resolve_backend

CASES = {
    # policy options -> Triton ops the fused graph must hold (op: count, for a 6-block DeiT-Tiny)
    "ats ragged": ({"policy": "ats"}, {"triton_varlen_attention": 3, "triton_gather_packed": 6}),
    "ats padded": ({"policy": "ats", "mode": "padded"}, {"triton_gather_tokens": 6}),
    "topk": ({"policy": "topk", "blocks": [1, 3]}, {"triton_topk_gather": 2}),
    "topk fuse": ({"policy": "topk", "blocks": [1, 3], "fuse": True}, {"triton_topk_gather": 2}),
    "tome": ({"policy": "tome", "r": 8}, {"triton_tome_merge": 6}),
}
tk = torch.ops.tokenopt
FUSED_AWAY = {tk.topk_select.default, tk.evit_fuse.default, tk.tome_slots.default, tk.merge_tokens.default,
              tk.varlen_attention.default, tk.gather_rows.default, tk.gather_tokens.default}


@pytest.fixture(scope="module")
def deit():
    return timm_model("deit_tiny_patch16_224", depth=6)


def _tokenopt_ops(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("tokenopt.triton_"))


@pytest.mark.parametrize("case", CASES)
def test_each_chain_becomes_one_custom_op(deit, case):
    options, expected = CASES[case]
    gm = tokenopt.optimize(deit, kernels="reference", **options)
    assert not _tokenopt_ops(gm)  # the reference path has no Triton op
    n_before = len(gm.graph.nodes)
    result = FuseKernels("triton")(gm)
    assert result.modified
    counters = gm.meta["tokenopt.counters"]["fuse_kernels"]
    assert counters == {"backend": "triton", "fused": expected}
    got = {}
    for name in _tokenopt_ops(gm):
        key = name.split(".")[1]
        got[key] = got.get(key, 0) + 1
    assert got == expected
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FUSED_AWAY]
    assert not left, [n.format_node() for n in left]
    assert len(gm.graph.nodes) <= n_before  # a chain becomes one op; a one-to-one swap keeps the count
    # the ops print by name in the generated code and keep their block and role
    assert "torch.ops.tokenopt.triton_" in gm.code
    for n in gm.graph.nodes:
        if str(n.target).startswith("tokenopt.triton_"):
            assert n.meta["tokenopt.provenance"]["pass"] == "fuse_kernels"
            assert n.meta["tokenopt.block"] is not None
    gm.graph.lint()


def test_auto_keeps_the_reference_path_on_cpu(deit):
    gm = tokenopt.optimize(deit, policy="tome", r=4)  # kernels="auto"
    assert gm.meta["tokenopt.counters"]["fuse_kernels"] == {"backend": "reference", "fused": {}}
    assert resolve_backend("auto", gm) == "reference"
    assert not _tokenopt_ops(gm)


def test_bad_backend_is_rejected(deit):
    with pytest.raises(ValueError, match="kernels='cuda'.*auto, triton, reference"):
        tokenopt.optimize(deit, policy="tome", kernels="cuda")


def test_a_chain_whose_intermediate_is_used_elsewhere_is_left_alone(deit):
    gm = tokenopt.optimize(deit, policy="topk", blocks=[2], kernels="reference")
    cls = next(n for n in gm.graph.nodes if n.target is tk.cls_attention.default)
    with gm.graph.inserting_after(cls):  # someone else reads the CLS attention row
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (cls,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], extra),)
    gm.recompile()
    FuseKernels("triton")(gm)
    assert gm.meta["tokenopt.counters"]["fuse_kernels"]["fused"] == {"triton_gather_tokens": 1}
    assert any(n.target is tk.topk_select.default for n in gm.graph.nodes)
