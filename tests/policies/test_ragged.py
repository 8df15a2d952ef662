"""ATS with per-image token counts: ragged (packed) against padded and masked, batch invariance and
the degenerate cases."""

import pytest
import torch

import tokenopt
from tests.models import hf_vit, logits, timm_model


@pytest.fixture(scope="module")
def deit():
    return timm_model("deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def ragged(deit):
    return tokenopt.optimize(deit, policy="ats", max_tokens=0.5)


def test_ragged_padded_and_masked_agree(deit, ragged):
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        out = ragged(x)
        for mode in ("padded", "masked"):
            torch.testing.assert_close(tokenopt.optimize(deit, policy="ats", max_tokens=0.5, mode=mode)(x), out)
    kinds = {str(n.target) for n in ragged.graph.nodes if n.op == "call_function"}
    assert {"tokenopt.varlen_attention.default", "tokenopt.gather_rows.default", "tokenopt.packed_select.default"} <= kinds
    # after the first ATS block no dense SDPA is left
    sdpa_blocks = [n.meta["tokenopt.block"] for n in ragged.graph.nodes
                   if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert sdpa_blocks == [0, 1, 2]


def test_batch_invariance_alone_and_in_a_mixed_batch_of_32(ragged):
    torch.manual_seed(1)
    # a mixed batch: noise at several scales, smooth images, a constant image
    x = torch.randn(32, 3, 224, 224) * torch.linspace(0.2, 3.0, 32)[:, None, None, None]
    x[5] = torch.nn.functional.interpolate(torch.randn(1, 3, 7, 7), size=224, mode="bilinear")[0]
    x[9] = 0.5
    with torch.no_grad():
        together = ragged(x)
        counts = tokenopt.token_counts(ragged, x)
        for i in range(32):
            torch.testing.assert_close(ragged(x[i:i + 1]), together[i:i + 1])
    assert len(set(counts[11].tolist())) > 1  # the batch really is ragged


def test_batch_of_one_and_empty_batch(deit, ragged):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        padded = tokenopt.optimize(deit, policy="ats", max_tokens=0.5, mode="padded")
        torch.testing.assert_close(ragged(x), padded(x))
        empty = ragged(torch.randn(0, 3, 224, 224))
    assert empty.shape == (0, 1000)


def test_images_that_keep_every_token_equal_the_original(deit):
    keep_all = tokenopt.optimize(deit, policy="ats", max_tokens=1.0, min_tokens=196)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(keep_all(x), deit(x))
    assert all(c.tolist() == [197] * 3 for c in tokenopt.token_counts(keep_all, x).values())


def test_nan_image_stays_in_its_own_row(ragged):
    x = torch.randn(4, 3, 224, 224)
    x_nan = x.clone()
    x_nan[2] = float("nan")
    with torch.no_grad():
        clean, dirty = ragged(x), ragged(x_nan)
    assert torch.isnan(dirty[2]).all()
    torch.testing.assert_close(dirty[[0, 1, 3]], clean[[0, 1, 3]])


def test_ragged_on_hugging_face_and_mean_pooling():
    from tests.reference_models import Policy, hf_forward

    model = hf_vit(layers=6)
    gm = tokenopt.optimize(model, policy="ats", max_tokens=40)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected, _ = hf_forward(model, x, Policy("ats", (3, 4, 5), max_tokens=40))
        torch.testing.assert_close(logits(gm(x)), expected)

    # a mean-pooling head over the packed tokens: compare with the padded path
    avg = timm_model("vit_small_patch16_224", global_pool="avg", depth=6)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ragged = tokenopt.optimize(avg, policy="ats", max_tokens=40)
        padded = tokenopt.optimize(avg, policy="ats", max_tokens=40, mode="padded")
        torch.testing.assert_close(ragged(x), padded(x))
    assert any(n.target is torch.ops.tokenopt.packed_mean.default for n in ragged.graph.nodes)
