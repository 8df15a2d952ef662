import doctest

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassResult

import importlib

import tokenopt
from tokenopt.ir import META_PROVENANCE
from tokenopt.pipeline import PassError, Pipeline, register_pass
from tests.models import timm_model


@pytest.mark.parametrize(
    "module", ["tokenopt", "tokenopt.pipeline", "tokenopt.api", "tokenopt.capture", "tokenopt.explain",
               "tokenopt.passes.find_blocks"]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _double_output(gm):
    """A user pass: multiply the model output by 2 with one inserted node."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (val,) = out.args[0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (val, 2.0))
    out.args = ((doubled,),)
    return PassResult(gm, True)


def test_user_pass_runs_and_its_nodes_carry_provenance():
    model = timm_model("deit_tiny_patch16_224", depth=1)
    gm = tokenopt.capture(model)
    pipe = Pipeline(["find_blocks", _double_output], policy="mine")
    gm = pipe.run(gm)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), 2 * model(x))
    inserted = [n for n in gm.graph.nodes if META_PROVENANCE in n.meta]
    assert len(inserted) == 1
    assert inserted[0].meta[META_PROVENANCE] == {"pass": "_double_output", "policy": "mine"}
    assert [(r.name, r.added) for r in pipe.records] == [("find_blocks", 0), ("_double_output", 1)]


def test_failing_pass_is_named_with_the_passes_before_it():
    @register_pass("breaks_the_graph")
    def breaks(gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.args = (node.args[0], *node.args[1:])
        gm.graph.erase_node(node)  # users still refer to it
        return PassResult(gm, True)

    gm = tokenopt.capture(timm_model("deit_tiny_patch16_224", depth=1))
    with pytest.raises(PassError, match=r"pass 'breaks_the_graph' failed.*\n\(passes that ran before it: find_blocks\)"):
        Pipeline(["find_blocks", "breaks_the_graph"]).run(gm)


def test_unknown_pass_name_lists_registered_ones():
    with pytest.raises(KeyError, match="find_blocks"):
        Pipeline(["no_such_pass"]).run(tokenopt.capture(timm_model("deit_tiny_patch16_224", depth=1)))


def test_explain_reports_blocks_and_listing():
    import io

    from rich.console import Console

    gm = tokenopt.optimize(timm_model("deit_tiny_patch16_224", depth=3), policy="none")
    text = tokenopt.explain(gm, block=1, console=Console(file=io.StringIO(), width=240))
    assert "3 blocks, 1 prefix + 196 patch tokens" in text
    assert "block 1 as captured" in text and "aten.scaled_dot_product_attention" in text
    rows = importlib.import_module("tokenopt.explain").block_stats(gm)
    assert [r["tokens_in"] for r in rows[:3]] == ["197", "197", "197"]
    assert rows[0]["flops"] > 0
    with pytest.raises(IndexError, match="blocks 0..2"):
        tokenopt.explain(gm, block=7, console=Console(file=io.StringIO()))
