"""PiToMe (energy-guided merging): the graph against an eager reference of the algorithm written out image
by image, both variants; switched off it equals the model; calibration accepts it."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenopt
from tests.reference_models import _timm_blocks


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8, num_classes=5).eval()


def pitome_groups(metric, r, margin, alpha, best_edges):
    """One image's merge groups (lists of patch indices, in the order of the tokens that stay), from the
    PiToMe rule: energy = mean_j elu(cos_ij - margin); tokens ranked by energy (ties: position)."""
    m = F.normalize(metric, dim=-1)
    sim = m @ m.T
    t = sim.shape[0]
    energy = F.elu(sim - margin, alpha=alpha).mean(1)
    order = sorted(range(t), key=lambda j: (-float(energy[j]), j))
    if best_edges:
        a_set, b_set = order[0::2], order[1::2]
        best = {a: max(b_set, key=lambda b: (float(sim[a, b]), -b_set.index(b))) for a in a_set}
        ranked = sorted(a_set, key=lambda a: (-float(sim[a, best[a]]), a_set.index(a)))
        partner = {a: best[a] for a in ranked[:r]}
    else:
        a_set, b_set = order[0:2 * r:2], order[1:2 * r:2]
        partner = {a: max(b_set, key=lambda b: (float(sim[a, b]), -b_set.index(b))) for a in a_set}
    stay = [j for j in range(t) if j not in partner]
    return [[j] + [a for a in partner if partner[a] == j] for j in stay]


def pitome_forward(model, img, r, margin, alpha, best_edges):
    """The timm ViT with PiToMe after each block's attention: size-weighted merges, log(size) added to
    later attention logits."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    blocks = _timm_blocks(model)
    size = torch.ones(x.shape[0], x.shape[1], 1)
    merged = False
    for i, blk in enumerate(blocks):
        q, k, v = blk.qkv(blk.norm1(x))
        bias = size.log()[:, None, None, :, 0] if merged else None
        x = x + blk.ls1(blk.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=blk.scale).transpose(1, 2).flatten(2)))
        rr = min(r, (x.shape[1] - 1) // 2)
        if rr > 0:
            metric = k.mean(1)
            rows, sizes = [], []
            for b in range(x.shape[0]):
                groups = pitome_groups(metric[b, 1:], rr, margin * (1 - i / len(blocks)), alpha, best_edges)
                new, new_size = [x[b, 0]], [size[b, 0]]
                for g in groups:
                    w = size[b, [j + 1 for j in g]]
                    new.append((x[b, [j + 1 for j in g]] * w).sum(0) / w.sum())
                    new_size.append(w.sum(0))
                rows.append(torch.stack(new))
                sizes.append(torch.stack(new_size))
            x, size, merged = torch.stack(rows), torch.stack(sizes), True
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("best_edges", [False, True])
def test_pitome_graph_equals_the_algorithm_written_out(vit, best_edges):
    x = torch.randn(3, 3, 64, 64)
    cfg = tokenopt.PiToMe(r=9, margin=0.5, best_edges=best_edges)  # (both variants)
    gm = tokenopt.optimize(vit, policy=cfg, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), pitome_forward(vit, x, 9, 0.5, 1.0, best_edges), atol=1e-5, rtol=1e-5)
    assert {b: c.tolist() for b, c in tokenopt.token_counts(gm, x).items()} == {0: [56] * 3, 1: [47] * 3, 2: [38] * 3, 3: [29] * 3}


def test_pitome_switched_off_equals_the_model_and_checks_its_options(vit):
    x = torch.randn(2, 3, 64, 64)
    gm = tokenopt.optimize(vit, policy="pitome", r=0, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(gm(x), vit(x))
    with pytest.raises(ValueError, match="margin must be a number in"):
        tokenopt.PiToMe(margin=2.0)
    with pytest.raises(ValueError, match="r must be an int >= 0"):
        tokenopt.PiToMe(r=-3)


def test_pitome_merges_the_clustered_tokens_and_protects_an_isolated_one():
    """Five near-identical tokens and one unlike them: the energy ranks the clustered ones first, so with
    r = 2 the isolated token stays alone, and merged tokens stand for their slot."""
    base = torch.tensor([1.0, 0.0, 0.0])
    metric = torch.stack([base + 0.01 * i * torch.tensor([0.0, 1.0, 0.0]) for i in range(5)] + [torch.tensor([0.0, 0.0, 1.0])])
    metric = torch.cat([torch.zeros(1, 3), metric])[None]  # a prefix token in front
    slot, rep = torch.ops.tokenopt.pitome_slots(metric, 2, 1, 0.5, 1.0, None)
    assert slot[0, 0] == 0 and slot[0, -1] not in slot[0, :-1]  # the isolated token has a slot of its own
    assert int(slot.max()) + 1 == 7 - 2 and int(rep.sum()) == 7 - 2


def test_calibrate_accepts_pitome(vit):
    sample = torch.randn(6, 3, 64, 64)
    res = tokenopt.calibrate(vit, "pitome", sample, flops=0.7, shapes=("decreasing",), steps=3, progress=False)
    assert isinstance(res.config, tokenopt.PiToMe) and res.flops_ratio <= 0.7
    gm = tokenopt.optimize(vit, policy=res.config, example_inputs=(sample[:2],))
    from tokenopt.flops import count_flops

    assert count_flops(gm, sample[:2]) / count_flops(vit, sample[:2]) == pytest.approx(res.flops_ratio)
    assert math.isfinite(res.fidelity)


@pytest.mark.parametrize("best_edges", [False, True])
def test_pitome_export_form_ranks_like_the_stable_sort_ties_included(best_edges):
    """The ONNX export form ranks with topk (ONNX has TopK, no sort); ties go to the lower index there as in a
    stable descending sort, so both forms make the same decision, on tied metrics too."""
    from tokenopt.kernels import reference as ref

    torch.manual_seed(0)
    metric = torch.randn(3, 1 + 40, 16)
    metric[0, 5:20] = metric[0, 5]  # a flat region: identical tokens, tied energies and similarities
    metric[1, 1:] = 1.0  # every token the same
    for r in (1, 7, 20):
        a = ref.pitome_slots(metric, r, 1, 0.5, 1.0, None, best_edges)
        b = ref.pitome_slots(metric, r, 1, 0.5, 1.0, None, best_edges, by_topk=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), r
        assert torch.equal(ref.tome_slots(metric, r, 1), ref.tome_slots(metric, r, 1, None, True)), r
    v = torch.randint(0, 4, (5, 300)).float()  # many ties
    assert torch.equal(ref.stable_descending_order(v), torch.sort(v, dim=1, descending=True, stable=True).indices)
