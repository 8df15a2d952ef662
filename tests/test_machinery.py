"""The token machinery: decisions apart from execution, composition, sync and op counts, compile, ONNX.

Every rewritten model is held to an eager reference of the same algorithm (tests/reference_models.py).
"""

import dataclasses
import math
import re

import pytest
import torch

import tokenopt
from tests.models import timm_model
from tests.reference_models import Policy, timm_forward
from tokenopt.ir import Keep
from tokenopt.policies import register_policy
from tokenopt.profile import count_dispatch

tk = torch.ops.tokenopt


@pytest.fixture(scope="module")
def deit():
    return timm_model("deit_tiny_patch16_224", depth=6)


POLICIES = {
    "topk": (dict(policy="topk", blocks=(1, 3)), Policy("topk", (1, 3), keep_rate=0.7)),
    "topk_fuse": (dict(policy="topk", blocks=(1, 3), fuse=True), Policy("topk", (1, 3), keep_rate=0.7, fuse=True)),
    "tome": (dict(policy="tome", r=9), Policy("tome", tuple(range(6)), r=9)),
    "ats": (dict(policy="ats", max_tokens=60, blocks=(2, 3, 4, 5)), Policy("ats", (2, 3, 4, 5), max_tokens=60)),
}


@pytest.mark.parametrize("mode", ["padded", "masked", "packed"])
@pytest.mark.parametrize("key", sorted(POLICIES))
def test_every_policy_runs_in_every_execution_form(deit, key, mode):
    options, pol = POLICIES[key]
    gm = tokenopt.optimize(deit, mode=mode, **options)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected, ref_counts = timm_forward(deit, x, pol)
        torch.testing.assert_close(gm(x), expected)
    for block, c in tokenopt.token_counts(gm, x).items():
        assert c.tolist() == ref_counts[block].tolist(), block
    if mode == "masked":  # nothing leaves the buffer: every block still sees 197 rows
        assert all(int(n.meta["val"].shape[1]) == 197 for n in gm.graph.nodes
                   if n.meta.get("tokenopt.role") == "mlp.add")


def test_composite_prune_then_merge_matches_eager_reference(deit):
    gm = tokenopt.optimize(deit, policy=[tokenopt.TopK(keep_rate=0.6, blocks=(1,)), tokenopt.ToMe(r=10, blocks=(2, 3, 4, 5))])
    x = torch.randn(3, 3, 224, 224)
    pols = [Policy("topk", (1,), keep_rate=0.6), Policy("tome", (2, 3, 4, 5), r=10)]
    with torch.no_grad():
        expected, ref_counts = timm_forward(deit, x, pols)
        torch.testing.assert_close(gm(x), expected)
    counts = {b: c.tolist() for b, c in tokenopt.token_counts(gm, x).items()}
    kept = 1 + math.ceil(0.6 * 196)
    assert counts[0] == [197] * 3 and counts[1] == [kept] * 3
    assert counts[2] == [kept - 10] * 3 and counts[5] == [kept - 40] * 3
    assert {b: c.tolist() for b, c in ref_counts.items()} == counts
    assert "TopK" in repr(gm.meta["tokenopt.policy"]) and "ToMe" in repr(gm.meta["tokenopt.policy"])


def test_composite_merge_then_adaptive_sampling_and_masked_form_agree(deit):
    parts = [tokenopt.ToMe(r=8, blocks=(0, 1)), tokenopt.ATS(max_tokens=50, blocks=(3, 4))]
    x = torch.randn(2, 3, 224, 224)
    pols = [Policy("tome", (0, 1), r=8), Policy("ats", (3, 4), max_tokens=50)]
    with torch.no_grad():
        expected, _ = timm_forward(deit, x, pols)
        for mode in ("padded", "masked"):
            torch.testing.assert_close(tokenopt.optimize(deit, policy=parts, mode=mode)(x), expected)
    # packed attention does not carry ToMe's proportional sizes: refused with the way out
    with pytest.raises(tokenopt.passes.RewriteError, match="proportional attention.*mode='padded'"):
        tokenopt.optimize(deit, policy=parts, mode="packed")


def test_two_policies_in_one_block_and_merge_after_adaptive_are_refused(deit):
    with pytest.raises(tokenopt.passes.RewriteError, match="same block.*different blocks="):
        tokenopt.optimize(deit, policy=[tokenopt.TopK(blocks=(2,)), tokenopt.ToMe(r=4, blocks=(2,))])
    with pytest.raises(tokenopt.passes.RewriteError, match="same for every image.*adaptive"):
        tokenopt.optimize(deit, policy=[tokenopt.ATS(blocks=(1,)), tokenopt.ToMe(r=4, blocks=(3,))], mode="padded")


# --- a new policy in a few lines: the worked example of docs/ARCHITECTURE.md -------------------------


@register_policy
@dataclasses.dataclass(frozen=True)
class RandomDrop(tokenopt.PolicyConfig):
    """Keep ``keep`` random patch tokens per image after attention, at ``blocks``."""

    keep: int = 64
    blocks: tuple = (2,)
    name = "random_drop"

    def decide(self, ctx):
        p = ctx.num_prefix
        noise = ctx.call(torch.ops.aten.rand_like.default, ctx.value_norms())  # [B, L] uniform scores
        if ctx.valid is not None:  # never pick padding
            noise = ctx.call(torch.ops.aten.where.ScalarOther, ctx.valid, noise, -1.0)
        scores = ctx.call(torch.ops.aten.unsqueeze.default, noise, 1)  # [B, 1, L]: one "head"
        idx = ctx.call(tk.topk_select.default, scores, self.keep, p)
        return Keep(idx, p + self.keep)


def test_random_drop_policy_is_a_few_lines_and_runs_in_every_form(deit):
    x = torch.randn(2, 3, 224, 224)
    outs = {}
    for mode in ("padded", "masked", "packed"):
        gm = tokenopt.optimize(deit, policy="random_drop", keep=40, mode=mode)
        torch.manual_seed(0)
        with torch.no_grad():
            outs[mode] = gm(x)
        assert tokenopt.token_counts(gm, x)[2].tolist() == [41, 41]
    torch.testing.assert_close(outs["masked"], outs["padded"])
    torch.testing.assert_close(outs["packed"], outs["padded"])
    # eager reference: the same draw, the same kept tokens
    from tests.reference_models import _timm_blocks
    from tokenopt.kernels import reference as ref

    torch.manual_seed(0)
    with torch.no_grad():
        h = deit.norm_pre(deit.patch_drop(deit._pos_embed(deit.patch_embed(x))))
        for i, blk in enumerate(_timm_blocks(deit)):
            q, k, v = blk.qkv(blk.norm1(h))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=blk.scale)
            h = h + blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
            if i == 2:
                noise = torch.rand(h.shape[0], h.shape[1])
                h = ref.gather_tokens(h, ref.topk_select(noise[:, None], 40, 1), 1)
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        torch.testing.assert_close(outs["padded"], deit.forward_head(deit.norm(h)))


# --- what a forward dispatches --------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit12():
    return timm_model("deit_tiny_patch16_224")


@pytest.mark.parametrize("options, max_ratio, max_syncs", [
    (dict(policy="none"), 1.01, 0),
    (dict(policy="topk"), 1.3, 0),
    (dict(policy="topk", fuse=True), 1.3, 0),
    (dict(policy="tome"), 1.3, 0),
    (dict(policy="ats", mode="padded"), 1.5, 0),
    (dict(policy="ats", mode="masked"), 1.5, 0),
    (dict(policy="ats"), 1.5, 9),  # packed: one host read per reducing block (blocks 3..11)
])
def test_op_and_sync_counts_per_forward(deit12, options, max_ratio, max_syncs):
    x = torch.randn(4, 3, 224, 224)
    base = count_dispatch(deit12, x)
    gm = tokenopt.optimize(deit12, **options)
    got = count_dispatch(gm, x)
    assert base.syncs == 0
    assert got.ops <= max_ratio * base.ops, (got.ops, base.ops)
    assert got.syncs == max_syncs, got.sync_ops
    if max_syncs:
        assert dict(got.sync_ops) == {"aten.item.default": max_syncs}  # all in pack_index
    # the graph itself reads nothing back and loops over nothing
    code = gm.code
    for forbidden in (r"\.item\(\)", r"\.tolist\(\)", r"(?<![.\w])int\(", r"\bfor\b"):
        assert not re.search(forbidden, code), forbidden
    assert not any(n.target is torch.ops.aten.index.Tensor for n in gm.graph.nodes)


def test_references_never_read_values_without_dispatching():
    """``Tensor.tolist`` reads memory without dispatching (count_dispatch cannot see it): the references
    behind the ops must not use it."""
    import inspect

    from tokenopt.kernels.ops import REFERENCES

    for name, fn in REFERENCES.items():
        assert ".tolist()" not in inspect.getsource(fn), name


def test_count_dispatch_sees_syncs_inside_custom_ops():
    idx = torch.tensor([[0, 2, 1], [0, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    c = count_dispatch(lambda: tk.pack_index(idx, valid, None, 4))
    assert c.ops == 1 and c.syncs == 1


# --- compile and export ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deit4():
    return timm_model("deit_tiny_patch16_224", depth=4)


# torch.compile of every policy's graph (fullgraph, three batch sizes, CI=true, cold caches, dynamic either way):
# tests/test_release.py, through tests/scripts/compile_every_policy.py


@pytest.mark.slow
@pytest.mark.parametrize("case", ["topk", "tome", "composite"])
def test_onnx_round_trip_in_onnxruntime(deit4, case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    options = {"topk": dict(policy="topk", blocks=(1,), fuse=True),
               "tome": dict(policy="tome", r=12),
               "composite": dict(policy=[tokenopt.TopK(keep_rate=0.8, blocks=(1,)),
                                         tokenopt.ToMe(r=10, blocks=(2, 3))])}[case]
    gm = tokenopt.optimize(deit4, **options)
    x = torch.randn(2, 3, 224, 224)
    # torch's own export path, with tokenopt's decomposition table passed explicitly (nothing global)
    exported = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = exported.run_decompositions(tokenopt.kernels.ops.decompositions())
    program = torch.onnx.export(exported, (x,), dynamo=True)
    path = tmp_path / "m.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    for batch in (1, 5):
        xb = torch.randn(batch, 3, 224, 224)
        xb[0, :, :112] = 0.5  # flat regions: identical patches, tied similarities (ties go to the lower index)
        got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), gm(xb), atol=1e-4, rtol=1e-4)


def test_training_graph_gradients_flow_through_the_token_ops(deit4):
    """The masked form is differentiable: gradients reach the weights through every token op and
    equal those of the padded form (same kept tokens, nothing else contributes)."""
    x = torch.randn(2, 3, 224, 224)
    grads = {}
    for mode in ("masked", "padded"):
        gm = tokenopt.optimize(deit4, policy="topk", blocks=(1,), fuse=True, mode=mode)
        gm(x).square().sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
        for p in gm.parameters():
            p.grad = None
    assert grads["masked"].keys() == grads["padded"].keys() and len(grads["masked"]) > 20
    for name in grads["masked"]:
        torch.testing.assert_close(grads["masked"][name], grads["padded"][name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["cls_attention", "merge_tokens", "gather_tokens", "evit_fuse", "varlen_attention",
                                  "weighted_mean", "token_bias"])
def test_op_gradients_equal_the_reference(name):
    """Autograd of each differentiable op equals autograd of its plain-PyTorch reference (gradcheck in
    float64 on small irregular shapes)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)

    slot = torch.tensor([[0, 1, 3, 2, 3, 1, -1], [0, 3, 1, 2, 2, 1, 1]])
    idx = torch.tensor([[0, 4, 2], [0, 1, 6]])
    cu = torch.tensor([0, 3, 5])
    cases = {
        "cls_attention": (lambda q, k: tk.cls_attention(q, k, 0.3, None), (r(2, 3, 7, 4), r(2, 3, 7, 4))),
        "merge_tokens": (lambda x, s: tk.merge_tokens(x, s, slot, 4)[0], (r(2, 7, 5), (torch.rand(2, 7, 1, generator=g, dtype=torch.float64) + 1).requires_grad_())),
        "gather_tokens": (lambda x: tk.gather_tokens(x, idx, 1), (r(2, 7, 5),)),
        "evit_fuse": (lambda x, a: tk.evit_fuse(x, a, idx, 1), (r(2, 7, 5), r(2, 3, 7))),
        "varlen_attention": (lambda q, k, v: tk.varlen_attention(q, k, v, cu, cu, 3, 3, 0.5, None), (r(1, 2, 5, 4), r(1, 2, 5, 4), r(1, 2, 5, 4))),
        "weighted_mean": (lambda x: tk.weighted_mean(x, None, None, 1, None), (r(2, 7, 5),)),
        "token_bias": (lambda s: tk.token_bias(None, s, torch.float64), ((torch.rand(2, 7, 1, generator=g, dtype=torch.float64) + 1).requires_grad_(),)),
    }
    fn, args = cases[name]
    assert torch.autograd.gradcheck(fn, args)
