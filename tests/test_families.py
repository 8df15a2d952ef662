"""ViT families whose blocks read per-token side tables or pool with attention, reduced by ToMe (the
policy that needs no CLS token) and held to eager references of the same algorithm.

* EVA-02 (rotary tables ``[Np, 2D]`` multiplied into q/k): each image's rotary rows follow its tokens,
  a merged token keeps its destination's (ToMe's surviving token) position;
* relative-position ViT (an ``[H, N, N]`` bias computed from parameters, passed to attention): each
  image's bias is the table at its tokens' positions;
* SigLIP-style attention-pool head (a learned query attends to every token): it attends to the
  reduced tokens, merged ones weighted by size (``log(size)`` in its logits).

The references run the models' own modules and change only what the algorithm changes: an SDPA spy
gathers the relative-position bias and adds ToMe's proportional-attention bias; positions are tracked
here from ToMe's own (unm, src, dst) output, independently of the library's slot bookkeeping.
"""

import pytest
import torch
import torch.nn.functional as F

import tokenopt
from tests.models import timm_model
from tokenopt.kernels import reference as ref

R = 12


class _SDPASpy:
    """Stands in for F.scaled_dot_product_attention inside the models' own modules."""

    def __init__(self):
        self.pos = self.bias = self.k = None
        self.orig = F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, **kw):
        self.q, self.k = q, k
        if attn_mask is not None and attn_mask.shape[-1] != k.shape[-2]:  # an N x N relative-position bias
            attn_mask = ref.pair_gather(attn_mask, self.pos, self.pos)
        if self.bias is not None and q.shape[-2] > 1 or self.bias is not None and attn_mask is None:
            attn_mask = self.bias if attn_mask is None else attn_mask + self.bias
        return self.orig(q, k, v, attn_mask=attn_mask, **kw)

    def __enter__(self):
        F.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.orig


def _tome_step(spy, x, size, p):
    """ToMe on the keys the spy saw; positions follow ToMe's output order [prefix, unmerged A, B]."""
    unm, src, dst = ref.tome_match(spy.k.mean(1), R, p)
    pos_a, pos_b = spy.pos[:, p::2], spy.pos[:, p + 1::2]
    spy.pos = torch.cat([spy.pos[:, :p], torch.gather(pos_a, 1, unm), pos_b], 1)
    x, size = ref.tome_merge(x, size, unm, src, dst, p)
    spy.bias = ref.size_to_bias(size)
    return x, size


def _topk_step(spy, x, size, p, keep_rate=0.6):
    """EViT top-k by the CLS row of the attention the spy saw; positions follow the kept tokens."""
    cls = ref.cls_attention(spy.q, spy.k, spy.q.shape[-1] ** -0.5, spy.bias)
    patches = x.shape[1] - p
    idx = ref.topk_select(cls, int(-(-keep_rate * patches // 1)), p)
    spy.pos = torch.gather(spy.pos, 1, idx)
    return ref.gather_tokens(x, idx, 1), size


def _eva_reference(model, img, step=None, blocks=None):
    step = step or _tome_step
    p = model.num_prefix_tokens
    with _SDPASpy() as spy:
        x, rope = model._pos_embed(model.patch_embed(img))
        x = model.norm_pre(x)
        spy.pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        size = None
        for blk in model.blocks:
            rope_img = rope[spy.pos[:, p:] - p][:, None]  # [B, 1, L - P, 2D]: each image's rows
            a = blk.attn(blk.norm1(x), rope=rope_img)
            x = x + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
            if blocks is None or model.blocks[blocks[0]] is blk:
                x, size = step(spy, x, size, p)
            m = blk.mlp(blk.norm2(x))
            x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
        x = model.norm(x)
    pooled = ref.sized_mean(x, size, p) if size is not None else x[:, p:].mean(1)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def test_topk_on_a_rotary_model_gathers_each_images_rotary_rows():
    model = timm_model("eva02_tiny_patch14_224", depth=3)
    x = torch.randn(2, 3, 224, 224)
    for mode in ("padded", "masked"):
        gm = tokenopt.optimize(model, policy="topk", keep_rate=0.6, blocks=(1,), mode=mode)
        with torch.no_grad():
            expected = _eva_reference(model, x, step=_topk_step, blocks=(1,))
            torch.testing.assert_close(gm(x), expected, atol=2e-5, rtol=1e-4)
    assert tokenopt.token_counts(gm, x)[2].tolist() == [1 + 154] * 2


def _relpos_reference(model, img):
    with _SDPASpy() as spy:
        x = model.patch_embed(img)
        spy.pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
        size = None
        for blk in model.blocks:
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), shared_rel_pos=shared)))
            x, size = _tome_step(spy, x, size, 0)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = model.norm(x)
    pooled = ref.sized_mean(x, size, 0)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def _siglip_reference(model, img):
    with _SDPASpy() as spy:
        x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
        spy.pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        size = None
        for blk in model.blocks:
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            x, size = _tome_step(spy, x, size, 0)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = model.norm(x)
        pooled = model.attn_pool(x)  # the spy adds log(size) to the pooling query's logits too
    return model.head(model.head_drop(model.fc_norm(pooled)))


def _beit_reference(model, img):
    """BEiT: a relative-position bias per block (its own table, ``[1, H, N, N]``), CLS + mean-pooled head."""
    with _SDPASpy() as spy:
        x = model.patch_embed(img)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        spy.pos = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        size = None
        for blk in model.blocks:
            a = blk.attn(blk.norm1(x), shared_rel_pos_bias=shared)
            x = x + (blk.gamma_1 * a if blk.gamma_1 is not None else a)
            x, size = _tome_step(spy, x, size, 1)
            m = blk.mlp(blk.norm2(x))
            x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
        x = model.norm(x)
    return model.head(model.head_drop(model.fc_norm(ref.sized_mean(x, size, 1))))


FAMILIES = {
    "eva02 (rotary)": ("eva02_tiny_patch14_224", _eva_reference),
    "relpos vit": ("vit_relpos_small_patch16_224", _relpos_reference),
    # its table is laid out [N, N, H] by a reshape of weights alone, after the first token op
    "beit (relative-position bias per block)": ("beit_base_patch16_224", _beit_reference),
    "siglip (attention pool)": ("vit_base_patch16_siglip_224", _siglip_reference),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tome_on_side_table_and_pooling_families_matches_eager_reference(family):
    name, reference = FAMILIES[family]
    model = timm_model(name, depth=3)
    if name.startswith(("vit_relpos", "beit")):  # make the relative-position tables non-trivial
        with torch.no_grad():
            for pname, prm in model.named_parameters():
                if prm.dim() == 2 and prm.shape[0] > 100 and prm.shape[1] == 6 or "relative_position_bias_table" in pname:
                    prm.normal_(0, 1)
    x = torch.randn(2, 3, 224, 224)
    gm = tokenopt.optimize(model, policy="tome", r=R)
    none = tokenopt.optimize(model, policy="none")
    with torch.no_grad():
        torch.testing.assert_close(none(x), model(x))
        expected = reference(model, x)
        torch.testing.assert_close(gm(x), expected, atol=2e-5, rtol=1e-4)
    n = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0)
    assert tokenopt.token_counts(gm, x)[2].tolist() == [n - 3 * R] * 2
    # the masked form agrees; packing is refused with the reason
    torch.testing.assert_close(tokenopt.optimize(model, policy="tome", r=R, mode="masked")(x), gm(x))


def _hf_beit_reference(model, img):
    """Hugging Face BEiT with ToMe, written from its modules: each layer's relative-position bias
    ``[1, H, N, N]`` gathered for each image's current tokens, ToMe after attention, mean-pooled head."""
    beit = model.beit
    x = beit.embeddings(img)
    b, n, _ = x.shape
    pos = torch.arange(n).expand(b, -1)
    window = (img.shape[2] // model.config.patch_size, img.shape[3] // model.config.patch_size)
    size = None
    for layer in beit.layers:
        att = layer.attention
        table = layer.relative_position_bias(window, False, dim_size=n)  # the captured N x N table
        bias = ref.pair_gather(table, pos, pos)
        if size is not None:
            bias = bias + ref.size_to_bias(size)
        h = layer.layernorm_before(x)
        q, k, v = (proj(h).view(b, h.shape[1], -1, att.head_dim).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=att.scaling)
        x = x + layer.lambda_1 * att.o_proj(a.transpose(1, 2).reshape(b, h.shape[1], -1))
        unm, src, dst = ref.tome_match(k.mean(1), R // 4, 1)
        pa, pb = pos[:, 1::2], pos[:, 2::2]
        pos = torch.cat([pos[:, :1], torch.gather(pa, 1, unm), pb], 1)
        x, size = ref.tome_merge(x, size, unm, src, dst, 1)
        x = x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))
    x = beit.layernorm(x)
    return model.classifier(beit.pooler.layernorm(ref.sized_mean(x, size, 1)))


def test_tome_on_hugging_face_beit_gathers_its_batch_expanded_bias():
    """HF BEiT adds its expanded attention mask to the relative-position table, so the table reaches
    attention as ``[B, H, N, N]``; it reads no image, so one row of its batch axis is gathered per image."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, intermediate_size=192,
                                  image_size=64, patch_size=8, use_relative_position_bias=True, num_labels=5,
                                  layer_scale_init_value=0.5)
    model = transformers.BeitForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "relative_position_bias_table" in name:
                prm.normal_(0, 1)
    x = torch.randn(2, 3, 64, 64)
    gm = tokenopt.optimize(model, policy="tome", r=R // 4, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x).logits, _hf_beit_reference(model, x), atol=2e-5, rtol=1e-4)
    assert tokenopt.token_counts(gm, x)[2].tolist() == [65 - 3 * (R // 4)] * 2


def test_cls_policies_on_register_only_models_are_refused_with_the_reason():
    model = timm_model("vit_small_patch14_reg4_dinov2", img_size=112, class_token=False, global_pool="avg", depth=3)
    with pytest.raises(tokenopt.passes.RewriteError, match="registers, not a CLS token.*policy='tome'"):
        tokenopt.optimize(model, policy="topk", blocks=(1,))
    gm = tokenopt.optimize(model, policy="tome", r=4)  # needs no CLS token
    x = torch.randn(2, 3, 112, 112)
    assert tokenopt.token_counts(gm, x)[2].tolist() == [4 + 64 - 12] * 2


def test_packed_tokens_with_rotary_tables_are_refused_with_the_way_out():
    model = timm_model("eva02_tiny_patch14_224", depth=3)
    with pytest.raises(tokenopt.passes.RewriteError, match="rotary or relative-position.*mode='padded'"):
        tokenopt.optimize(model, policy="ats", blocks=(1,))
    gm = tokenopt.optimize(model, policy="ats", blocks=(1,), max_tokens=80, mode="padded")
    counts = tokenopt.token_counts(gm, torch.randn(2, 3, 224, 224))
    assert all(1 + 8 <= c <= 1 + 80 for c in counts[2].tolist())
