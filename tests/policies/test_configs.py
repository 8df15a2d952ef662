import copy

import pytest
import torch

import tokenopt
from tests.models import timm_model


@pytest.mark.parametrize(
    "policy, options, message",
    [
        ("ats", dict(max_tokens=0), "max_tokens must be a token count"),
        ("ats", dict(max_tokens=1.5), "max_tokens must be a token count"),
        ("ats", dict(min_tokens=-1), "min_tokens must be an int >= 0"),
        ("topk", dict(keep_rate=0.0), r"keep_rate must be a float in \(0, 1\]"),
        ("topk", dict(keep_rate="half"), "keep_rate must be a float"),
        ("topk", dict(blocks=3), "blocks must be a sequence of block indices"),
        ("tome", dict(r=-2), "r must be an int >= 0"),
        ("tome", dict(r=[1, "a"]), "r must be an int >= 0"),
        ("nope", {}, "unknown policy 'nope'; choose one of (.*, )?ats, (.*, )?none, (.*, )?tome, topk"),
    ],
)
def test_invalid_configs_are_refused_with_the_fix(policy, options, message):
    with pytest.raises(ValueError, match=message):
        tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=1), policy=policy, **options)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="policy 'topk' has no option keep; its options are: blocks, fuse, keep_rate"):
        tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=1), policy="topk", keep=0.5)


def test_config_instance_and_alias_give_the_same_graph():
    model = timm_model("deit_tiny_patch16_224", depth=4)
    x = torch.randn(2, 3, 224, 224)
    a = tokenopt.optimize(model, policy=tokenopt.TopK(keep_rate=0.5, blocks=(1, 2)))
    b = tokenopt.optimize(model, policy="topk", keep_rate=0.5, blocks=[1, 2])
    assert a.meta["tokenopt.policy"] == b.meta["tokenopt.policy"] == tokenopt.TopK(0.5, (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_blocks_out_of_range_name_the_range():
    with pytest.raises(tokenopt.passes.RewriteError, match=r"blocks \[12\] do not exist; the model has blocks 0..3"):
        tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=4), policy="tome", blocks=(12,))


def test_optimize_does_not_modify_the_model():
    model = timm_model("deit_tiny_patch16_224", depth=4).train()
    state = copy.deepcopy(model.state_dict())
    tokenopt.optimize(model, policy="tome", r=8)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("policy", ["ats", "topk"])
def test_cls_scoring_policies_refuse_models_without_a_cls_token(policy):
    model = timm_model("vit_base_patch16_224", global_pool="avg", class_token=False, depth=4)
    with pytest.raises(tokenopt.passes.RewriteError, match="no prefix token.*use policy='tome'"):
        tokenopt.optimize(model, policy=policy)


def test_tome_on_an_average_pooling_model_pools_by_size():
    from tests.reference_models import Policy, timm_forward

    model = timm_model("vit_base_patch16_224", global_pool="avg", class_token=False, depth=4)
    gm = tokenopt.optimize(model, policy="tome", r=20)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, _ = timm_forward(model, x, Policy("tome", tuple(range(4)), r=20))
        torch.testing.assert_close(gm(x), expected)
    assert any(n.target is torch.ops.tokenopt.weighted_mean.default for n in gm.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "__name__"))


def test_fixed_budget_graphs_have_static_shapes():
    """TopK and ToMe: the token count of every block depends only on the input shape."""
    model = timm_model("deit_tiny_patch16_224", depth=6)
    for policy, opts in [("topk", dict(keep_rate=0.5, blocks=(1, 3))), ("tome", dict(r=16))]:
        gm = tokenopt.optimize(model, policy=policy, **opts)
        seen = set()
        for seed in range(3):
            torch.manual_seed(seed)
            counts = tokenopt.token_counts(gm, torch.randn(2, 3, 224, 224) * (seed + 1))
            seen.add(tuple(tuple(c.tolist()) for c in counts.values()))
        assert len(seen) == 1


class _PerTokenBiasBlock(torch.nn.Module):
    """A block that adds a learned table sized for the full token count (like rotary tables)."""

    def __init__(self, dim, tokens):
        super().__init__()
        from tests.models import HandBlock

        self.inner = HandBlock(dim, 3)
        self.table = torch.nn.Parameter(torch.randn(1, tokens, dim) * 0.01)

    def forward(self, x):
        return self.inner(x + self.table)


def test_parts_sized_for_the_full_token_count_get_a_clear_error():
    from tests.models import HandViT

    model = HandViT(depth=3).eval()
    model.layers = torch.nn.ModuleList(_PerTokenBiasBlock(96, 65) for _ in range(3))
    with pytest.raises(tokenopt.passes.RewriteError, match=r"(?s)fails on the example inputs at node add_\d+ \(between blocks, in layers.1\).*blocks="):
        tokenopt.optimize(model, policy="tome", r=8, example_inputs=(torch.randn(2, 3, 64, 64),))
    # reducing only in the last block is fine
    gm = tokenopt.optimize(model, policy="tome", r=8, blocks=(2,), example_inputs=(torch.randn(2, 3, 64, 64),))
    assert tokenopt.token_counts(gm, torch.randn(2, 3, 64, 64))[2].tolist() == [57, 57]


# --- hardening: each symptom, refused up front with the fix ---------------------------------------


def test_boolean_options_must_be_booleans():
    with pytest.raises(ValueError, match="proportional_attention must be True or False; got 'false'"):
        tokenopt.ToMe(proportional_attention="false")


def test_ats_floor_above_its_budget_is_refused():
    with pytest.raises(ValueError, match=r"min_tokens \(20\) exceeds max_tokens \(10\)"):
        tokenopt.ATS(max_tokens=10, min_tokens=20)
    with pytest.raises(tokenopt.passes.RewriteError, match=r"min_tokens \(30\) exceeds max_tokens \(0.1 = 20"):
        tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=4), policy="ats", max_tokens=0.1, min_tokens=30)


def test_triton_kernels_on_cpu_get_the_accurate_hint(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels='triton' needs the model on CUDA.*kernels='reference'"):
        tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=2), policy="tome", kernels="triton")


def test_explain_takes_negative_blocks_as_optimize_does():
    import io

    from rich.console import Console

    gm = tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=3), policy="tome", r=4, blocks=(-1,))
    text = tokenopt.explain(gm, block=-1, console=Console(file=io.StringIO(), width=200))
    assert "block 2 as captured" in text
