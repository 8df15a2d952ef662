import pytest
import torch
import torch.nn as nn

import tokenopt
from tokenopt.ir import META_BLOCK, META_ROLE
from tests.models import ACCEPTANCE, logits, timm_model


@pytest.mark.parametrize("name", sorted(ACCEPTANCE))
def test_find_blocks_counts_and_none_policy_equals_eager(name):
    build, n_blocks, prefix, patches, readers, size = ACCEPTANCE[name]
    model = build()
    gm = tokenopt.optimize(model, policy="none", example_inputs=(torch.randn(2, 3, size, size),))
    info = tokenopt.get_model_info(gm)

    assert len(info.blocks) == n_blocks
    assert info.num_prefix_tokens == prefix
    assert info.num_patch_tokens == patches
    assert [r.kind for r in info.head_readers] == readers
    assert [b.index for b in info.blocks] == list(range(n_blocks))
    for b in info.blocks:
        assert b.tokens == prefix + patches
        assert b.attention.num_heads * b.attention.head_dim == b.channels
        assert len(b.mlp.linears) >= 2
        assert b.attn_add.meta[META_ROLE] == "attn.add" and b.mlp_add.meta[META_ROLE] == "mlp.add"
        assert b.attention.core.meta[META_BLOCK] == b.index
    for before, after in zip(info.blocks, info.blocks[1:]):
        assert after.x_in is before.x_out  # the residual stream runs block to block

    # any batch size, not only the example's
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(logits(gm(x)), logits(model(x)))


def test_layer_scale_and_qk_norm_are_recorded():
    info = tokenopt.get_model_info(tokenopt.capture(timm_model("vit_small_patch14_reg4_dinov2", img_size=112, depth=2)))
    assert all(b.layer_scale1 is not None and b.layer_scale2 is not None for b in info.blocks)
    info = tokenopt.get_model_info(tokenopt.capture(timm_model("vit_small_patch16_224", qk_norm=True, depth=2)))
    b = info.blocks[0]
    # with qk-norm, attention consumes the normalised q and k
    assert b.attention.q.target == torch.ops.aten.layer_norm.default
    assert b.attention.k.target == torch.ops.aten.layer_norm.default
    assert b.layer_scale1 is None


def test_manual_attention_scale_is_read_from_the_graph():
    from tests.models import hand_vit, vit_fused_off

    info = tokenopt.get_model_info(tokenopt.capture(vit_fused_off(depth=1)))
    att = info.blocks[0].attention
    assert att.kind == "manual" and att.num_heads == 6 and att.scale == pytest.approx(64**-0.5)
    info = tokenopt.get_model_info(tokenopt.capture(hand_vit(depth=1), example_inputs=(torch.randn(2, 3, 64, 64),)))
    att = info.blocks[0].attention
    assert att.kind == "manual" and att.num_heads == 3 and att.scale == pytest.approx(32**-0.5)


@pytest.mark.parametrize(
    "model, example",
    [
        (lambda: timm_model("resnet18"), torch.randn(2, 3, 64, 64)),
        (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(2, 16)),
    ],
    ids=["resnet18", "mlp"],
)
def test_models_without_attention_get_a_clear_error(model, example):
    with pytest.raises(tokenopt.NoAttentionError, match="no attention blocks found"):
        tokenopt.optimize(model(), policy="none", example_inputs=(example,))
