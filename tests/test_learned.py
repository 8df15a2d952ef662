"""DynamicViT and SaiT: training graphs against eager references of their equations (forward and
gradients), inference graphs against the training graphs in eval mode, the density knob, and the work
really gone (FLOPs counted while the emitted graph runs)."""

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenopt
from tests.reference_models import _timm_blocks
from tokenopt.flops import count_flops


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8, num_classes=5).eval()


def _embed(model, img):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))


def _block(blk, x, attend):
    q, k, v = blk.qkv(blk.norm1(x))
    x = x + blk.ls1(blk.proj(attend(q, k, v).transpose(1, 2).flatten(2)))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _predict(pred, x, w):
    """DynamicViT's predictor, written out: local half, kept-token mean of the global half, 3-layer MLP."""
    h = F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], pred.norm.weight, pred.norm.bias, pred.norm.eps),
                        pred.embed.weight, pred.embed.bias))
    c = h.shape[-1] // 2
    g = (h[..., c:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    h = torch.cat([h[..., :c], g.expand(-1, h.shape[1], -1)], -1)
    h = F.gelu(F.linear(h, pred.fc1.weight, pred.fc1.bias))
    h = F.gelu(F.linear(h, pred.fc2.weight, pred.fc2.bias))
    return F.log_softmax(F.linear(h, pred.fc3.weight, pred.fc3.bias), -1)


def _policy_softmax(q, k, v, scale, policy, eps=1e-6):
    """``softmax_with_policy`` of the DynamicViT code, as its paper states it."""
    a = (q @ k.transpose(-1, -2)) * scale
    n = a.shape[-1]
    m = policy[:, None, None, :]
    m = m + (1 - m) * torch.eye(n)
    a = torch.exp(a - a.max(-1, keepdim=True).values) * m
    a = (a + eps / n) / (a.sum(-1, keepdim=True) + eps)
    return a @ v


@pytest.mark.parametrize("with_bias", [False, True])
def test_policy_attention_equals_the_policy_softmax_with_the_models_bias(with_bias):
    """``tokenopt::policy_attention`` against ``softmax_with_policy`` written out (the [N, N] mask, the
    diagonal kept), a model's relative-position bias added to the logits first: forward and gradients,
    the bias's included (it is a trained table)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[1, 0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1, 1]], dtype=torch.float32, requires_grad=True)
    bias = (torch.randn(1, 3, 7, 7, generator=g) * 2).requires_grad_(True) if with_bias else None
    got = torch.ops.tokenopt.policy_attention(q, k, v, keep, 0.35, bias)
    n = 7
    a = (q @ k.transpose(-1, -2)) * 0.35 + (bias if with_bias else 0)
    m = keep[:, None, None, :] + (1 - keep[:, None, None, :]) * torch.eye(n)
    a = torch.exp(a - a.max(-1, keepdim=True).values) * m
    want = ((a + 1e-6 / n) / (a.sum(-1, keepdim=True) + 1e-6)) @ v
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(got.shape, generator=g)
    leaves = [q, k, v, keep] + ([bias] if with_bias else [])
    grads_got = torch.autograd.grad((got * w).sum(), leaves)
    grads_want = torch.autograd.grad((want * w).sum(), leaves)
    for a_, b_ in zip(grads_got, grads_want):
        torch.testing.assert_close(a_, b_, atol=1e-4, rtol=1e-4)


def test_dynamicvit_trains_on_a_relative_position_model():
    """BEiT's per-block relative-position bias stays in the logits the soft mask weighs; the training
    step reaches the table and the predictors, and the eval graph equals the inference graph."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                              num_classes=5).eval()
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "relative_position_bias_table" in name:
                prm.normal_(0, 1)
    x = torch.randn(2, 3, 64, 64)
    tm = tokenopt.prepare_training(model, policy="dynamicvit", example_inputs=(x,))
    assert any(n.target == torch.ops.tokenopt.policy_attention.default and n.args[5] is not None
               for n in tm.graph.nodes)
    out = tm(x)
    (out.square().mean() + sum(tm.aux_losses().values())).backward()
    table = tm.get_parameter("blocks.3.attn.relative_position_bias_table")
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert tm.get_submodule("tokenopt_dynamicvit.predictor0").fc3.weight.grad.abs().sum() > 0
    tm.eval()
    gm = tokenopt.optimize(model, policy="dynamicvit", example_inputs=(x,), policy_state=tm.policy_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tm(x), atol=1e-5, rtol=1e-5)


def dynamicvit_train_reference(model, preds, img, stages, rho):
    blocks = _timm_blocks(model)
    x = _embed(model, img)
    b, n, _ = x.shape
    prev = torch.ones(b, n - 1, 1)
    policy, keeps = None, []
    for i, blk in enumerate(blocks):
        if policy is None:
            x = _block(blk, x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=blk.scale))
        else:
            x = _block(blk, x, lambda q, k, v: _policy_softmax(q, k, v, blk.scale, policy))
        if i in stages:
            logp = _predict(preds[stages.index(i)], x[:, 1:], prev)
            hard = F.gumbel_softmax(logp, hard=True)[..., 0:1] * prev  # draws its noise as the graph does
            keeps.append(hard[..., 0])
            policy = torch.cat([torch.ones(b, 1), hard[..., 0]], 1)
            prev = hard
    logits = model.forward_head(model.norm(x))
    ratio = sum(((k.mean(1) - rho ** (s + 1)) ** 2).mean() for s, k in enumerate(keeps)) / len(keeps)
    return logits, keeps, ratio


def _dynamicvit_training(model, cfg, x):
    """``prepare_training`` of a 4-block ``model`` under DynamicViT ``cfg``: the module, its stages, its predictors."""
    tm = tokenopt.prepare_training(model, policy=cfg, example_inputs=(x,))
    stages = cfg.stages(4)
    return tm, stages, [tm.get_submodule(f"tokenopt_dynamicvit.predictor{s}") for s in range(len(stages))]


def test_dynamicvit_training_graph_equals_the_equations_forward_and_gradients(vit):
    model, x = copy.deepcopy(vit).train(), torch.randn(3, 3, 64, 64)
    cfg = tokenopt.DynamicViT(rho=0.6, ratio_weight=2.0)
    tm, stages, preds = _dynamicvit_training(model, cfg, x)
    torch.manual_seed(7)
    out = tm(x)
    got = tm.aux_losses()
    torch.manual_seed(7)
    ref = copy.deepcopy(model).train()
    ref.load_state_dict(tm.model_state_dict())
    ref_preds = copy.deepcopy(preds)
    want_logits, want_keeps, want_ratio = dynamicvit_train_reference(ref, ref_preds, x, stages, 0.6)
    torch.testing.assert_close(out, want_logits, atol=1e-5, rtol=1e-5)
    for k_got, k_want in zip(tm.aux["keep"], want_keeps):
        assert torch.equal(k_got, k_want)  # the same hard samples
    assert 0 < float(want_keeps[-1].detach().mean()) < 1  # (and some tokens were dropped)
    torch.testing.assert_close(got["ratio"], 2.0 * want_ratio)
    stats = tm.training_stats()  # the kept share of the patches per stage, as the equations kept them
    assert list(stats) == [f"keep{s + 1}" for s in range(len(stages))]
    for s, k_want in enumerate(want_keeps):
        torch.testing.assert_close(stats[f"keep{s + 1}"], k_want.detach().float().mean())
    # gradients: task loss + ratio loss, into the backbone and into the predictors (straight-through)
    y = torch.tensor([0, 1, 2])
    (F.cross_entropy(out, y) + got["ratio"]).backward()
    (F.cross_entropy(want_logits, y) + 2.0 * want_ratio).backward()
    for name in ("blocks.1.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "head.weight"):
        torch.testing.assert_close(tm.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
    for p, q in zip(preds, ref_preds):
        assert p.fc3.weight.grad is not None and p.fc3.weight.grad.abs().sum() > 0
        torch.testing.assert_close(p.fc3.weight.grad, q.fc3.weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.norm.weight.grad, q.norm.weight.grad, atol=1e-5, rtol=1e-4)


def test_dynamicvit_inference_graph_equals_the_training_graph_in_eval_and_prunes(vit):
    cfg = tokenopt.DynamicViT(rho=0.7)
    x = torch.randn(4, 3, 64, 64)
    tm = tokenopt.prepare_training(copy.deepcopy(vit), policy=cfg, example_inputs=(x,))
    with torch.no_grad():  # some training-like change to the predictors, so the ranking is not the init's
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tm.eval()
    model = copy.deepcopy(vit)
    model.load_state_dict(tm.model_state_dict(), strict=True)
    gm = tokenopt.optimize(model, policy=cfg, example_inputs=(x,), policy_state=tm.policy_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tm(x), atol=1e-5, rtol=1e-5)
    counts = tokenopt.token_counts(gm, x)
    want = [1 + int(64 * 0.7 ** (s + 1)) for s in range(3)]  # pruned after blocks 0, 1, 2: int(N * rho^stage) + CLS
    assert {b: c.tolist() for b, c in counts.items()} == {b: [n] * 4 for b, n in enumerate([65] + want)}
    # the work is gone: FLOPs counted as the graph runs equal the model's at those token counts
    # (+ the predictors, on the patch tokens each one scores)
    c = vit.embed_dim
    predictors = 4 * sum(n - 1 for n in [65] + want[:-1]) * 2 * (c * c + c * c // 2 + c // 2 * c // 4 + c // 4 * 2)
    assert count_flops(gm, x) == vit_flops(vit, [65] + want, batch=4) + predictors
    assert count_flops(gm, x) < 0.75 * count_flops(vit, x)


def dynamicvit_inference_reference(model, preds, img, stages, rho):
    """DynamicViT at inference, written out: after each stage's block, keep the CLS token and the
    ``int(patches * rho ** stage)`` patch tokens with the highest keep log-probability, in their order."""
    blocks = _timm_blocks(model)
    x = _embed(model, img)
    patches = x.shape[1] - 1
    for i, blk in enumerate(blocks):
        x = _block(blk, x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=blk.scale))
        if i in stages:
            s = stages.index(i)
            keep_logp = _predict(preds[s], x[:, 1:], torch.ones(x.shape[0], x.shape[1] - 1, 1))[..., 0]
            top = keep_logp.topk(int(patches * rho ** (s + 1)), dim=1).indices.sort(dim=1).values + 1
            idx = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.long), top], 1)
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return model.forward_head(model.norm(x))


def test_dynamicvit_inference_graph_equals_the_equations(vit):
    cfg = tokenopt.DynamicViT(rho=0.7)
    x = torch.randn(3, 3, 64, 64)
    tm, _, preds = _dynamicvit_training(copy.deepcopy(vit), cfg, x)
    with torch.no_grad():  # predictors whose ranking differs from token to token
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = copy.deepcopy(vit)
    model.load_state_dict(tm.model_state_dict(), strict=True)
    gm = tokenopt.optimize(model, policy=cfg, example_inputs=(x,), policy_state=tm.policy_state_dict())
    with torch.no_grad():
        want = dynamicvit_inference_reference(model, preds, x, cfg.stages(4), 0.7)
        torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)


def test_models_that_output_every_token_train_and_infer_with_dense():
    """``Dinov2Model`` returns every token: ``dense=True`` keeps the grid in training and inference alike
    (the eval graph equals the inference graph), and a per-image policy, whose padded buffer cannot
    shrink, says that it saves nothing instead of returning a slower graph silently."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                                    image_size=28, patch_size=7)
    model = transformers.Dinov2Model(cfg).eval()
    x = torch.randn(2, 3, 28, 28)
    tm = tokenopt.prepare_training(model, policy="dynamicvit", example_inputs=(x,), dense=True)
    gm = tokenopt.optimize(model, policy="dynamicvit", example_inputs=(x,), dense=True,
                           policy_state=tm.policy_state_dict())
    tm.eval()
    with torch.no_grad():
        want, got = tm(x).last_hidden_state, gm(x).last_hidden_state
    assert got.shape == (2, 17, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert count_flops(gm, x) < 0.9 * count_flops(model, x)
    with pytest.warns(UserWarning, match="no work is saved. dense=True needs that buffer"):
        tokenopt.optimize(model, policy="sait", example_inputs=(x,), dense=True)
    with pytest.raises(ValueError, match="dense must be True or False"):
        tokenopt.prepare_training(model, policy="dynamicvit", example_inputs=(x,), dense="yes")


def test_dynamicvit_needs_its_trained_weights(vit):
    with pytest.warns(UserWarning, match="no trained weights for tokenopt_dynamicvit.predictor0"):
        tokenopt.optimize(vit, policy="dynamicvit", example_inputs=(torch.randn(2, 3, 64, 64),))
    with pytest.raises(ValueError, match="policy_state has weights this graph does not use"):
        tokenopt.optimize(vit, policy="dynamicvit", example_inputs=(torch.randn(2, 3, 64, 64),),
                          policy_state={"tokenopt_dynamicvit.predictor9.fc3.weight": torch.zeros(2, 48)})
    with pytest.raises(ValueError, match="rho must be a float in"):
        tokenopt.DynamicViT(rho=1.5)


def vit_flops(model, tokens_per_block, batch):
    """FLOPs of a timm ViT (2 per multiply-add: linears, attention, patch embedding and head) with block
    ``i`` running on ``tokens_per_block[i]`` tokens per image: an int, a list per image, or a pair
    (attention's, MLP's) when the block prunes between them."""
    c = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    total = 0
    for n in tokens_per_block:
        attn, mlp = n if isinstance(n, tuple) else (n, n)
        attn, mlp = ([t] * batch if isinstance(t, int) else t for t in (attn, mlp))
        total += sum(2 * t * 4 * c * c + 4 * t * t * c for t in attn) + sum(2 * t * 2 * c * hidden for t in mlp)
    patch = model.patch_embed.proj
    total += batch * 2 * model.patch_embed.num_patches * c * patch.in_channels * math.prod(patch.kernel_size)
    return total + batch * 2 * c * model.head.out_features


# --- SaiT -------------------------------------------------------------------------------------------


def mass_keep(cls_attn, density):
    """The SaiT rule written out: per image, patch tokens ranked by head-averaged CLS attention
    (renormalised over patches); keep the fewest whose mass reaches ``density`` (at least one)."""
    s = cls_attn.mean(1)[:, 1:]
    s = s / s.sum(1, keepdim=True)
    out = []
    for row in s:
        order = torch.argsort(row, descending=True, stable=True)
        mass, keep = 0.0, []
        for j in order.tolist():
            if keep and (mass >= density and density < 1):
                break
            keep.append(j)
            mass += row[j].item()
        out.append(sorted(keep))
    return out


def sait_reference(model, img, density, block):
    """Each image run alone on the tokens it keeps after ``block``'s attention."""
    blocks = _timm_blocks(model)
    logits, counts = [], []
    for i in range(img.shape[0]):
        x = _embed(model, img[i:i + 1])
        for j, blk in enumerate(blocks):
            q, k, v = blk.qkv(blk.norm1(x))
            x = x + blk.ls1(blk.proj(F.scaled_dot_product_attention(q, k, v, scale=blk.scale).transpose(1, 2).flatten(2)))
            if j == block:
                cls = ((q[:, :, :1] @ k.transpose(-1, -2)) * blk.scale).softmax(-1)[:, :, 0]
                keep = mass_keep(cls, density)[0]
                x = torch.cat([x[:, :1], x[:, [t + 1 for t in keep]]], 1)
                counts.append(len(keep) + 1)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        logits.append(model.forward_head(model.norm(x)))
    return torch.cat(logits), counts


def test_sait_packed_graph_equals_the_equations_and_density_is_a_knob(vit):
    x = torch.randn(5, 3, 64, 64)
    gm = tokenopt.optimize(vit, policy=tokenopt.SaiT(density=0.6, blocks=(1,)), example_inputs=(x,))
    assert gm.meta["tokenopt.counters"]["realize_tokens"]["mode"] == "packed" and gm.knobs == pytest.approx({"density": 0.6})
    code_before = gm.code
    for density in (0.6, 0.3, 1.0):
        gm.density = density  # a buffer of the graph: no rebuild
        with torch.no_grad():
            want, want_counts = sait_reference(vit, x, density, 1)
            torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)
        assert tokenopt.token_counts(gm, x)[1].tolist() == want_counts
        if density < 1:
            assert min(want_counts) < 65
            cls_row = 5 * 2 * 65 * vit.embed_dim  # (SaiT's score: the CLS row of block 1's attention)
            assert count_flops(gm, x) == vit_flops(vit, [65, (65, want_counts), want_counts, want_counts], batch=5) + cls_row
    assert gm.code == code_before
    with torch.no_grad():
        torch.testing.assert_close(gm(x), vit(x), atol=1e-5, rtol=1e-5)  # density 1: the model itself
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        gm.density = 0.0


def test_sait_train_density_is_a_share_or_a_range():
    """``train_density``: one share, every sparse step at it; or a range, a sparse step's density drawn from it."""
    assert tokenopt.SaiT(train_density=0.6).sparse_density(0.99) == 0.6
    wide = tokenopt.SaiT(train_density=(0.5, 0.9))
    assert wide.train_density == (0.5, 0.9)
    assert [wide.sparse_density(u) for u in (0.0, 0.5)] == [0.5, pytest.approx(0.7)]
    for bad, match in (((0.9, 0.5), "low > high"), ((0.5, 0.7, 0.9), "range .low, high. of two"),
                       ((0.0, 0.5), r"float in \(0, 1\]"), (1.5, r"float in \(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            tokenopt.SaiT(train_density=bad)


def test_sait_training_graph_forward_and_gradients_equal_per_image_runs(vit):
    model = copy.deepcopy(vit).train()
    x = torch.randn(3, 3, 64, 64)
    tm = tokenopt.prepare_training(model, policy=tokenopt.SaiT(density=0.5, blocks=(1,)), example_inputs=(x,))
    ref = copy.deepcopy(model).train()
    for density in (1.0, 0.5):  # SaiT's alternating dense and sparse steps: one graph, the knob set per step
        tm.density = density
        tm.zero_grad()
        ref.zero_grad()
        out = tm(x)
        want, _ = sait_reference(ref, x, density, 1)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        out.square().sum().backward()
        want.square().sum().backward()
        for name in ("blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.weight", "cls_token"):
            torch.testing.assert_close(tm.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-4, rtol=1e-4)
    # the trained weights load into the original architecture; the inference graph equals the training one
    model.load_state_dict(tm.model_state_dict(), strict=True)
    tm.eval()
    gm = tokenopt.optimize(model.eval(), policy=tokenopt.SaiT(density=0.5, blocks=(1,)), example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tm(x), atol=1e-5, rtol=1e-5)


def test_learned_policies_example_runs(capsys):
    from tests.models import run_example

    run_example("learned_policies")
    out = capsys.readouterr().out
    assert "avit: training losses ['ponder', 'prior']" in out and "dynamicvit: training losses ['ratio']" in out
    assert "adavit: training losses ['heads', 'layers', 'tokens']" in out and "block 3: heads run [3, 3, 3, 3]" in out
    assert "1: [45, 45, 45, 45]" in out  # DynamicViT: block 1 runs on int(64 * 0.7) + CLS tokens
    assert "density 1.0: [65, 65, 65, 65]" in out


def test_learned_graphs_save_load_and_explain(vit, tmp_path):
    x = torch.randn(3, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (untrained predictors)
        dv = tokenopt.optimize(vit, policy="dynamicvit", example_inputs=(x,))
    sa = tokenopt.optimize(vit, policy=tokenopt.SaiT(density=0.5), example_inputs=(x,))
    for gm in (dv, sa):
        tokenopt.explain(gm)
        tokenopt.save(gm, tmp_path / "m.pt2")
        back = tokenopt.load(tmp_path / "m.pt2")
        with torch.no_grad():
            assert torch.equal(back(x), gm(x))  # (compiled: tests/test_release.py, every policy)
        assert back.knobs == gm.knobs
    back.density = 1.0  # the knob survives saving
    with torch.no_grad():
        torch.testing.assert_close(back(x), vit(x), atol=1e-5, rtol=1e-5)


def test_a_composite_training_module_returns_its_parts_losses(vit):
    tm = tokenopt.prepare_training(copy.deepcopy(vit), policy=[tokenopt.TopK(keep_rate=0.8, blocks=(0,)),
                                                               tokenopt.AViT(beta=-1.0, blocks=(1, 2, 3))],
                                   example_inputs=(torch.randn(2, 3, 64, 64),))
    tm(torch.randn(2, 3, 64, 64))
    assert set(tm.aux_losses()) == {"ponder", "prior"}
    assert tm.training_stats() == {}  # (neither part reports statistics)


def test_dynamicvit_attention_loss_equals_the_equations_and_leaves_the_counts_to_the_ratio_loss(vit):
    """``attention_weight``: at each stage, KL from the head-averaged CLS attention of the block just run
    (renormalised over the patches still kept) to the softmax over those patches of the predictor's
    keep-minus-drop logit; its gradient reaches the predictors (and the backbone through their input, not
    through the target), and
    a shift of every logit (what the ratio loss moves) does not change it. Off (0): no such loss."""
    model, x = copy.deepcopy(vit).train(), torch.randn(3, 3, 64, 64)
    cfg = tokenopt.DynamicViT(rho=0.6, attention_weight=3.0)
    tm, stages, preds = _dynamicvit_training(model, cfg, x)
    torch.manual_seed(7)
    tm(x)
    got = tm.aux_losses()
    assert sorted(got) == ["attention", "ratio"]
    # the equations, from the same weights and the same hard samples
    ref = copy.deepcopy(model).train()
    ref.load_state_dict(tm.model_state_dict())
    preds_ref = copy.deepcopy(preds)
    blocks = _timm_blocks(ref)
    h = _embed(ref, x)
    b, n, _ = h.shape
    prev, policy, want = torch.ones(b, n - 1, 1), None, []
    for i, blk in enumerate(blocks):
        q, k, _ = blk.qkv(blk.norm1(h))
        cls = ((q[:, :, :1] @ k.transpose(-1, -2)) * blk.scale).softmax(-1).mean(1)[:, 0, 1:]  # [B, P]
        if policy is None:
            h = _block(blk, h, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=blk.scale))
        else:
            h = _block(blk, h, lambda q, k, v: _policy_softmax(q, k, v, blk.scale, policy))
        if i in stages:
            s = stages.index(i)
            logp = _predict(preds_ref[s], h[:, 1:], prev)
            kept = prev[..., 0]
            a = cls.detach() * kept  # (a fixed target)
            a = a / a.sum(1, keepdim=True)
            z = logp[..., 0] - logp[..., 1]
            logq = torch.where(kept > 0, z, torch.full_like(z, -math.inf)).log_softmax(1)
            want.append(torch.where(kept > 0, a * (a.log() - logq), torch.zeros_like(a)).sum(1).mean())
            hard = tm.aux["keep"][s].detach()[..., None]
            policy = torch.cat([torch.ones(b, 1), hard[..., 0]], 1)
            prev = hard
    assert 0 < float(prev.mean()) < 1  # (stage 2 saw dropped patches)
    torch.testing.assert_close(got["attention"], 3.0 * sum(want) / len(want), atol=1e-5, rtol=1e-5)
    got["attention"].backward()
    (3.0 * sum(want) / len(want)).backward()
    assert all(p.fc3.weight.grad is not None and p.fc3.weight.grad.abs().sum() > 0 for p in preds)
    for p, q in zip(preds, preds_ref):
        torch.testing.assert_close(p.fc3.weight.grad, q.fc3.weight.grad, atol=1e-6, rtol=1e-4)
    # the backbone gets the predictors' input's gradient only (the target is fixed)
    torch.testing.assert_close(tm.get_parameter("blocks.0.attn.qkv.weight").grad,
                               ref.get_parameter("blocks.0.attn.qkv.weight").grad, atol=1e-7, rtol=1e-4)
    # a shift of every logit leaves it unchanged
    from tokenopt.policies.dynamicvit import attention_rank_loss
    cls, logp, kept = torch.rand(2, 5), torch.randn(2, 5, 2).log_softmax(-1), torch.tensor([[1., 1, 0, 1, 1]] * 2)
    shifted = torch.stack([logp[..., 0] + 2.0, logp[..., 1]], -1)
    torch.testing.assert_close(attention_rank_loss(cls, logp, kept), attention_rank_loss(cls, shifted, kept))
    assert float(attention_rank_loss(cls, torch.stack([cls.log(), torch.zeros_like(cls)], -1), kept)) < 1e-6
    tm0 = tokenopt.prepare_training(model, policy=tokenopt.DynamicViT(rho=0.6), example_inputs=(x,))
    tm0(x)
    assert sorted(tm0.aux_losses()) == ["ratio"]


def test_dynamicvit_detach_predictors_keeps_their_losses_out_of_the_backbone(vit):
    """``detach_predictors``: the same forward, the same predictor gradients from the ratio and attention
    losses, and none of those losses' gradient in the blocks before the predictors (without it, some)."""
    x = torch.randn(3, 3, 64, 64)
    grads = {}
    for detach in (False, True):
        cfg = tokenopt.DynamicViT(rho=0.6, attention_weight=3.0, detach_predictors=detach)
        tm = tokenopt.prepare_training(copy.deepcopy(vit).train(), policy=cfg, example_inputs=(x,))
        torch.manual_seed(7)
        out = tm(x)
        sum(tm.aux_losses().values()).backward()
        grads[detach] = (out.detach(), tm.get_parameter("blocks.0.attn.qkv.weight").grad,
                         tm.get_submodule("tokenopt_dynamicvit.predictor0").fc3.weight.grad)
    torch.testing.assert_close(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][2], grads[False][2])
    assert grads[False][1] is not None and grads[False][1].abs().sum() > 0
    assert grads[True][1] is None or grads[True][1].abs().sum() == 0
    with pytest.raises(ValueError, match="detach_predictors"):
        tokenopt.DynamicViT(detach_predictors=1)
