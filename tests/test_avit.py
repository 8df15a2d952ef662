"""A-ViT adaptive halting: the training graph against the paper's equations written out here, the packed
inference graph against the masked one, and the weights going back into the model."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenopt
from tests.reference_models import _timm_blocks

CFG = tokenopt.AViT(gamma=5.0, beta=-1.0, ponder_weight=5e-3, prior_weight=0.1)  # tokens halt at blocks 0-3


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8, num_classes=5)


def avit_reference(model, img, cfg):
    """A-ViT (Yin et al. 2022) from the equations in shared/METHODS.md, on the model's own modules."""
    blocks = _timm_blocks(model)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    b, n, c = x.shape
    cum, rem, rho = torch.zeros(b, n), torch.ones(b, n), torch.zeros(b, n)
    mask, out, scores, counts = torch.ones(b, n), torch.zeros(b, n, c), [], {}
    for i, blk in enumerate(blocks):
        x = x * mask[..., None]  # halted tokens are zeroed ...
        bias = ((1 - mask) * -1000.0)[:, None, None, :]  # ... and masked out as keys
        q, k, v = blk.qkv(blk.norm1(x))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=blk.scale)
        x = x + blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
        y = x + blk.ls2(blk.mlp(blk.norm2(x)))
        h = torch.sigmoid(cfg.gamma * y[..., 0] - cfg.beta)  # halting score from the first channel
        scores.append(h)
        if i == len(blocks) - 1:
            h = torch.ones_like(h)  # every token halts at the last block
        y_live = y * mask[..., None]
        cum = cum + h
        reached = (cum > 1 - cfg.eps).float() * mask
        running = (cum < 1 - cfg.eps).float()
        out = out + y_live * (rem * reached + h * running)[..., None]
        rho = rho + mask + rem * reached
        rem = rem - running * h
        mask = running * mask
        counts[i] = mask.sum(1).long()
        x = y
    logits = model.forward_head(model.norm(out))
    q = torch.stack([s.mean() for s in scores])
    q = (q / q.sum()).clamp(0.01, 0.99)
    depth = len(blocks)
    prior = torch.tensor([math.exp(-0.5 * ((j - 2 * depth / 3) / cfg.prior_sigma) ** 2) for j in range(depth)])
    prior = prior / prior.sum()
    kl = (prior * (prior.log() - q.log())).sum() / depth  # KLDivLoss(reduction="batchmean") on a 1-D input
    losses = {"ponder": cfg.ponder_weight * rho.mean(), "prior": cfg.prior_weight * kl}
    return logits, scores, losses, counts


def test_training_graph_equals_the_equations_forward_and_gradients(vit):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 64, 64)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    tm = tokenopt.prepare_training(vit, policy=CFG)
    assert tm.training
    logits = tm(x)
    aux = tm.aux_losses()
    vit.train()
    want, scores, losses, counts = avit_reference(vit, x, CFG)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert len(tm.halting_scores()) == 4
    for got, ref in zip(tm.halting_scores(), scores):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for name in ("ponder", "prior"):
        torch.testing.assert_close(aux[name], losses[name], atol=1e-7, rtol=1e-5)
    assert 0 < counts[1].float().mean() < 65 and counts[1].tolist() != counts[0].tolist()  # halting happens
    # gradients of task + auxiliary losses, parameter by parameter
    (logits.square().mean() + sum(aux.values())).backward()
    (want.square().mean() + sum(losses.values())).backward()
    ref_grads = dict(vit.named_parameters())
    for name, p in tm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    vit.zero_grad(set_to_none=True)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())  # the model untouched


def test_packed_inference_equals_the_masked_graph_on_fewer_tokens(vit):
    vit.eval()
    x = torch.randn(4, 3, 64, 64)
    masked = tokenopt.optimize(vit, policy=CFG, mode="masked")
    packed = tokenopt.optimize(vit, policy=CFG)  # packed by default
    assert packed.meta["tokenopt.counters"]["realize_tokens"]["mode"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(packed(x), masked(x), atol=1e-5, rtol=1e-5)
        _, _, _, ref_counts = avit_reference(vit, x, CFG)
    got_p = tokenopt.token_counts(packed, x)
    got_m = tokenopt.token_counts(masked, x)
    for blk in range(3):  # after each block, the tokens still running: per image, as the equations say
        assert got_p[blk].tolist() == got_m[blk].tolist() == ref_counts[blk].tolist()
    assert got_p[2].max() < 65 and got_p[2].tolist() != [got_p[2][0].item()] * 4  # fewer, and per image
    vit.train()


def test_every_token_halting_leaves_an_empty_buffer_that_still_runs():
    """Hugging Face lays heads out with ``view(x, [B, N, -1, D])``; with every token halted after the
    first block the packed buffer has no rows and that -1 could not be inferred: the realisation writes
    its captured value (the head count) instead. The output equals the masked graph's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    policy = tokenopt.AViT(beta=-30.0)  # sigmoid(gamma * y - beta) ~ 1: every token halts at block 0
    packed = tokenopt.optimize(model, policy=policy, example_inputs=(x,))
    masked = tokenopt.optimize(model, policy=policy, example_inputs=(x,), mode="masked")
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, masked(x).logits, atol=1e-5, rtol=1e-5)
    assert tokenopt.token_counts(packed, x)[1].tolist() == [0, 0]


def test_trained_weights_go_back_into_the_model(vit):
    import copy

    model = copy.deepcopy(vit)
    tm = tokenopt.prepare_training(model, policy=CFG)
    opt = torch.optim.SGD(tm.parameters(), lr=0.5)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(tm(x), y) + sum(tm.aux_losses().values())
    loss.backward()
    opt.step()
    assert not torch.equal(model.head.weight, tm.get_parameter("head.weight"))  # trained apart from the model
    model.load_state_dict(tm.state_dict(), strict=True)
    assert torch.equal(model.head.weight, tm.get_parameter("head.weight"))
    gm = tokenopt.optimize(model.eval(), policy=CFG)
    tm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), tm(x), atol=1e-5, rtol=1e-5)  # (dropout 0: train form = eval form)


def test_avit_config_is_validated():
    with pytest.raises(ValueError, match="eps must be in"):
        tokenopt.AViT(eps=1.5)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        tokenopt.AViT(gamma="10")
    with pytest.raises(ValueError, match="must include the last block"):
        tokenopt.optimize(timm.create_model("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8),
                          policy="avit", blocks=(0, 1))


def test_halt_pack_equals_act_step_with_the_halted_rows_gone():
    """The packed inference op against the masked one: same accumulated outputs, same ACT state on the
    rows still running, those rows packed in order (an image whose tokens all halt keeps no row)."""
    tk = torch.ops.tokenopt
    gen = torch.Generator().manual_seed(0)
    b, n, c, eps = 3, 7, 5, 0.01
    ys = torch.randn(4, b, n, c, generator=gen)
    hs = torch.rand(4, b, n, generator=gen) * 0.7
    hs[1, 2] = 1.0  # image 2 halts entirely at the second step
    masked = dict(cum=None, rem=None, rho=None, acc=None, active=None)
    packed = dict(cum=None, rem=None, rho=None, grid=None, home=None, cu=None)
    for step in range(4):
        last = step == 3
        x_m, cum, rem, rho, acc, active = tk.act_step(ys[step], hs[step], masked["cum"], masked["rem"], masked["rho"],
                                                      masked["acc"], masked["active"], eps, last)
        masked = dict(cum=cum, rem=rem, rho=rho, acc=acc, active=active)
        y_p = ys[step] if packed["cu"] is None else ys[step].reshape(-1, c)[packed["home"]][None]
        h_p = hs[step] if packed["cu"] is None else hs[step].reshape(-1)[packed["home"]][None]
        x_p, cum_p, rem_p, rho_p, grid, home, cu, longest, running = tk.halt_pack(
            y_p, h_p, packed["cum"], packed["rem"], packed["rho"], packed["grid"], packed["home"], packed["cu"],
            eps, last, n)
        torch.testing.assert_close(grid, acc)
        if last:
            assert x_p.shape[1] == 0 and not running.any()
            break
        counts = active.sum(1)
        assert cu.tolist() == [0] + counts.cumsum(0).tolist() and longest.shape[0] == counts.max()
        rows = active.reshape(-1).nonzero().squeeze(1)
        assert torch.equal(home, rows)  # the running rows, in order, by their row in the grid
        torch.testing.assert_close(x_p[0], x_m.reshape(-1, c)[rows])
        for got, want in ((cum_p, cum), (rem_p, rem), (rho_p, rho)):
            torch.testing.assert_close(got[0], want.reshape(-1)[rows])
        packed = dict(cum=cum_p, rem=rem_p, rho=rho_p, grid=grid, home=home, cu=cu)
    assert step == 3 and counts[2] == 0


def test_halt_pack_schema_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    tk = torch.ops.tokenopt
    y, h = torch.randn(2, 5, 3), torch.rand(2, 5)
    args = (y, h, None, None, None, None, None, None, 0.01, False, 5)
    torch.library.opcheck(tk.halt_pack, args, test_utils=("test_schema", "test_autograd_registration"))
    real = tk.halt_pack(*args)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = tk.halt_pack(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for f, r in zip(fake, real):
        assert f.dtype == r.dtype and f.dim() == r.dim()
    assert isinstance(fake[0].shape[1], torch.SymInt) and tuple(fake[4].shape) == (2, 5, 3)
