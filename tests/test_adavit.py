"""AdaViT: the training graph against an eager reference of its equations (forward and gradients), the
inference graphs (masked, padded, packed) against each image run alone with its skipped heads,
sub-layers and tokens really left out, and the work gone: FLOPs counted while the emitted graph runs."""

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenopt
from tests.reference_models import _timm_blocks
from tokenopt.flops import count_flops

GATED, STAGES = (1, 2, 3), (1,)


from tests.test_learned import _embed, vit  # noqa: F401  (the same tiny ViT fixture)


def _net(net, x):
    return F.linear(F.layer_norm(x, x.shape[-1:], net.norm.weight, net.norm.bias, net.norm.eps), net.fc.weight, net.fc.bias)


def _gumbel_sigmoid(logits, tau, threshold):
    """The authors' ``_gumbel_sigmoid`` (hard, straight-through), drawing its noise as the graph does."""
    e1 = torch.empty_like(logits).exponential_()
    e2 = torch.empty_like(logits).exponential_()
    soft = ((logits + (e2.log() - e1.log())) / tau).sigmoid()
    return (soft > threshold).float() - soft.detach() + soft


def adavit_train_reference(model, nets, img, cfg):
    """The masked training form: head outputs, sub-layer outputs and token keys weighed by their gates."""
    x = _embed(model, img)
    b = x.shape[0]
    policy, aux = None, {"heads": [], "layers": [], "tokens": []}
    for i, blk in enumerate(_timm_blocks(model)):
        heads = attn_on = mlp_on = None
        if i in GATED:
            g = _gumbel_sigmoid(_net(nets[f"gate{i}"], x[:, 0]), cfg.tau, cfg.threshold)
            h = model.blocks[i].attn.num_heads
            heads, attn_on, mlp_on = g[:, :h], g[:, h], g[:, h + 1]
            aux["heads"].append(heads)
            aux["layers"].append(g[:, h:])
        q, k, v = blk.qkv(blk.norm1(x))
        if policy is None:
            o = F.scaled_dot_product_attention(q, k, v, scale=blk.scale)
        else:
            from tests.test_learned import _policy_softmax

            o = _policy_softmax(q, k, v, blk.scale, policy)
        if heads is not None:
            o = o * heads[:, :, None, None]
        branch = blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
        x = x + (branch if attn_on is None else attn_on[:, None, None] * branch)
        branch = blk.ls2(blk.mlp(blk.norm2(x)))
        x = x + (branch if mlp_on is None else mlp_on[:, None, None] * branch)
        if i in STAGES:
            keep = _gumbel_sigmoid(_net(nets[f"tokens{STAGES.index(i)}"], x[:, 1:]).squeeze(-1), cfg.tau, cfg.threshold)
            if policy is not None:
                keep = keep * policy[:, 1:]
            aux["tokens"].append(keep)
            policy = torch.cat([torch.ones(b, 1), keep], 1)
    return model.forward_head(model.norm(x)), aux


def adavit_inference_reference(model, nets, img, cfg):
    """Each image alone: a gate that is off means that head / sub-layer is not run; a token whose gate is
    off is removed. Returns the logits and, per image and block, (tokens, heads run or 0, MLP run). Each kind
    of gate is on above its own threshold where the config sets one."""
    def cut(own):
        t = cfg.threshold if own is None else own
        return math.log(t / (1 - t))

    cut_h, cut_l, cut_t = cut(cfg.head_threshold), cut(cfg.layer_threshold), cut(cfg.token_threshold)
    stages = cfg.token_stages(len(model.blocks))
    logits, usage = [], []
    for n in range(img.shape[0]):
        x = _embed(model, img[n:n + 1])
        rows = []
        for i, blk in enumerate(_timm_blocks(model)):
            h = model.blocks[i].attn.num_heads
            heads, attn_on, mlp_on = list(range(h)), True, True
            if i in GATED:
                g = _net(nets[f"gate{i}"], x[:, 0])[0]
                heads, attn_on, mlp_on = [j for j in range(h) if g[j] > cut_h], bool(g[h] > cut_l), bool(g[h + 1] > cut_l)
            t = x.shape[1]
            if attn_on:
                q, k, v = blk.qkv(blk.norm1(x))
                o = torch.zeros_like(q)
                for j in heads:
                    o[:, j] = F.scaled_dot_product_attention(q[:, j], k[:, j], v[:, j], scale=blk.scale)
                x = x + blk.ls1(blk.proj(o.transpose(1, 2).flatten(2)))
            if mlp_on:
                x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            rows.append((t, len(heads) if attn_on else 0, mlp_on))
            if i in stages:
                keep = (_net(nets[f"tokens{stages.index(i)}"], x[:, 1:]).squeeze(-1) > cut_t)[0]
                x = torch.cat([x[:, :1], x[:, 1:][:, keep]], 1)
        logits.append(model.forward_head(model.norm(x)))
        usage.append(rows)
    return torch.cat(logits), usage


def _varied(state, seed=0):
    """Gate biases spread around 0, so some heads, sub-layers and tokens are off (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 1.5 if k.endswith("fc.bias") else v) for k, v in state.items()}


def _nets(module):
    return dict(module.get_submodule("tokenopt_adavit").named_children())


def test_adavit_training_graph_equals_the_equations_forward_and_gradients(vit):
    model = copy.deepcopy(vit).train()
    cfg = tokenopt.AdaViT(blocks=GATED, token_blocks=STAGES, head_target=0.6, layer_target=0.7, token_target=0.6)
    x = torch.randn(4, 3, 64, 64)
    tm0 = tokenopt.prepare_training(model, policy=cfg, example_inputs=(x,))
    tm = tokenopt.prepare_training(model, policy=cfg, example_inputs=(x,), policy_state=_varied(tm0.policy_state_dict()))
    nets = _nets(tm)
    torch.manual_seed(3)
    out = tm(x)
    got = tm.aux_losses()
    ref = copy.deepcopy(model).train()
    ref.load_state_dict(tm.model_state_dict())
    ref_nets = copy.deepcopy(nets)
    torch.manual_seed(3)
    want, aux = adavit_train_reference(ref, ref_nets, x, cfg)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for key in ("heads", "layers", "tokens"):
        for a, b in zip(tm.aux[key], aux[key]):
            assert torch.equal(a, b)  # the same hard samples
    used = torch.cat([a.flatten() for key in aux for a in aux[key]])
    assert 0 < float(used.detach().mean()) < 1  # (some gates on, some off)
    want_losses = tokenopt.policies.adavit.adavit_losses(cfg, aux["heads"], aux["layers"], aux["tokens"])
    assert set(got) == {"heads", "layers", "tokens"}
    for key in got:
        torch.testing.assert_close(got[key], want_losses[key])
    # the losses written out for one term: AdaViT's layer usage |mean - target| + 0.1 |per-gate mean - target|
    use = torch.stack(aux["layers"], 1)
    torch.testing.assert_close(got["layers"], 2.0 * ((use.mean() - 0.7).abs() + 0.1 * (use.mean(0) - 0.7).abs().mean()))
    y = torch.tensor([0, 1, 2, 3])
    (F.cross_entropy(out, y) + sum(got.values())).backward()
    (F.cross_entropy(want, y) + sum(want_losses.values())).backward()
    for name in ("blocks.1.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "head.weight"):
        torch.testing.assert_close(tm.get_parameter(name).grad, ref.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
    for key in nets:
        assert nets[key].fc.weight.grad.abs().sum() > 0  # straight-through gradients reach every gate network
        torch.testing.assert_close(nets[key].fc.weight.grad, ref_nets[key].fc.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode,options", [("packed", {}), ("padded", {}), ("masked", {}),
                                          ("packed", {"head_threshold": 0.3, "layer_threshold": 0.4, "token_threshold": 0.6}),
                                          ("packed", {"token_blocks": (1, 2)})])  # a token stage on packed tokens
def test_adavit_inference_graph_equals_each_image_run_alone_and_skips_the_work(vit, mode, options):
    cfg = tokenopt.AdaViT(**{"blocks": GATED, "token_blocks": STAGES, **options})
    x = torch.randn(6, 3, 64, 64)
    tm = tokenopt.prepare_training(copy.deepcopy(vit), policy=cfg, example_inputs=(x,))
    state = _varied(tm.policy_state_dict(), seed=1)
    gm = tokenopt.optimize(vit, policy=cfg, mode=mode, example_inputs=(x,), policy_state=state)
    nets = _nets(gm)
    with torch.no_grad():
        want, usage = adavit_inference_reference(vit, nets, x, cfg)
        torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)
        if "token_threshold" in options:  # the kinds' own thresholds change what runs
            assert usage != adavit_inference_reference(vit, nets, x, tokenopt.AdaViT(blocks=GATED, token_blocks=STAGES))[1]
    heads_run = [u[1] for rows in usage for u in rows[1:]]
    assert 0 in heads_run and 0 < sum(heads_run) < 3 * len(heads_run)  # skipped heads and attention sub-layers
    assert not all(u[2] for rows in usage for u in rows)  # a skipped MLP
    stages = cfg.token_stages(len(vit.blocks))
    assert all(len({rows[b + 1][0] for rows in usage}) > 1 for b in stages)  # per-image token counts after each stage
    if mode == "masked":  # nothing is removed: the eval graph of training equals it
        tm2 = tokenopt.prepare_training(copy.deepcopy(vit), policy=cfg, example_inputs=(x,), policy_state=state).eval()
        with torch.no_grad():
            torch.testing.assert_close(tm2(x), gm(x), atol=1e-5, rtol=1e-5)
        return
    assert tokenopt.token_counts(gm, x)[2].tolist() == [rows[2][0] for rows in usage]
    used = tokenopt.gate_usage(gm, x)
    assert sorted(used) == list(GATED)
    for b in GATED:
        assert used[b]["heads"].tolist() == [rows[b][1] for rows in usage]
        assert used[b]["mlp"].tolist() == [rows[b][2] for rows in usage]
    if mode == "packed":  # the work is gone: FLOPs as the graph runs = the reference's per-image work
        c, h = vit.embed_dim, vit.blocks[0].attn.num_heads
        hidden = vit.blocks[0].mlp.fc1.out_features
        total = 0
        for rows in usage:
            for t, heads, mlp in rows:
                total += (2 * t * 4 * c * c + 4 * t * t * (c // h) * heads if heads else 0) + (2 * t * 2 * c * hidden if mlp else 0)
        total += 6 * len(GATED) * 2 * c * (h + 2)  # the gate networks
        # token gates: the first stage scores the 64 patches of each image; a later one every packed row it has
        total += sum(2 * c * (64 if s == stages[0] else rows[s][0]) for rows in usage for s in stages)
        patch = vit.patch_embed.proj
        total += 6 * 2 * 64 * c * patch.in_channels * math.prod(patch.kernel_size) + 6 * 2 * c * 5
        assert count_flops(gm, x) == total
        assert count_flops(gm, x) < 0.8 * count_flops(vit, x)


def test_adavit_with_every_gate_on_equals_the_model_and_the_options_are_checked(vit):
    x = torch.randn(3, 3, 64, 64)
    tm = tokenopt.prepare_training(copy.deepcopy(vit), policy="adavit", example_inputs=(x,))
    on = {k: (torch.full_like(v, 50.0) if k.endswith("fc.bias") else v) for k, v in tm.policy_state_dict().items()}
    gm = tokenopt.optimize(vit, policy="adavit", example_inputs=(x,), policy_state=on)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), vit(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to learn"):
        tokenopt.AdaViT(heads=False, layers=False, tokens=False)
    with pytest.raises(ValueError, match="head_target must be a share"):
        tokenopt.AdaViT(head_target=0)
    with pytest.raises(ValueError, match=r"token_threshold must be in \(0, 1\)"):
        tokenopt.AdaViT(token_threshold=1.2)
    assert tokenopt.AdaViT(threshold=0.7, head_threshold=0.5).cut("heads") == 0.0  # its own, not 0.7
    with pytest.warns(UserWarning, match=r"no trained weights for tokenopt_adavit.tokens0, tokenopt_adavit.gate1, .* and 3 more"):
        tokenopt.optimize(vit, policy="adavit", example_inputs=(x,))


def test_adavit_gates_only_on_a_model_without_cls_token_and_an_empty_sub_batch():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=32, patch_size=8, num_classes=4,
                              class_token=False, global_pool="avg").eval()
    x = torch.randn(3, 3, 32, 32)
    cfg = tokenopt.AdaViT(tokens=False)
    tm = tokenopt.prepare_training(copy.deepcopy(model), policy=cfg, example_inputs=(x,))
    state = tm.policy_state_dict()
    off = {k: (torch.full_like(v, -50.0) if k.endswith("fc.bias") else v) for k, v in state.items()}
    gm = tokenopt.optimize(model, policy=cfg, example_inputs=(x,), policy_state=off)
    with torch.no_grad():  # every gated part off for every image: blocks 1 and 2 do nothing
        blocks = _timm_blocks(model)
        h = _embed(model, x)
        blk = blocks[0]
        h = h + blk.ls1(blk.proj(F.scaled_dot_product_attention(*blk.qkv(blk.norm1(h)), scale=blk.scale).transpose(1, 2).flatten(2)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        torch.testing.assert_close(gm(x), model.forward_head(model.norm(h)), atol=1e-5, rtol=1e-5)


def test_attention_pooling_head_reads_per_image_token_counts():
    """A MAP head (one learned query attending to the tokens) after token gates: each image keeps its
    own tokens, so the head's keys are laid out per image with the padding masked; the longest count is
    known only at run time, so they are laid out at the captured count. Packed equals masked."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=32, patch_size=8, num_classes=4,
                              class_token=False, global_pool="map").eval()
    x = torch.randn(3, 3, 32, 32)
    cfg = tokenopt.AdaViT(heads=False, layers=False, token_blocks=(0,), token_threshold=0.9)
    state = _varied(tokenopt.prepare_training(copy.deepcopy(model), policy=cfg, example_inputs=(x,)).policy_state_dict())
    packed = tokenopt.optimize(model, policy=cfg, example_inputs=(x,), policy_state=state)
    masked = tokenopt.optimize(model, policy=cfg, example_inputs=(x,), policy_state=state, mode="masked")
    counts = tokenopt.token_counts(packed, x)[1].tolist()
    assert len(set(counts)) > 1 and max(counts) < 16  # per image, fewer than the 16 patches
    with torch.no_grad():
        torch.testing.assert_close(packed(x), masked(x), atol=1e-5, rtol=1e-5)


def test_cpu_attention_runs_equal_the_padded_references():
    """On a CPU, packed attention batches runs of images with the same length (and, for gated heads, the
    (image, head) pairs that are on): every grouping equals the padded, image-independent references."""
    ref = tokenopt.kernels.reference
    torch.manual_seed(0)
    lengths = [4, 4, 4, 6, 2, 2, 0, 0, 5, 3, 3, 7, 7]  # runs of 3, 1, 2, 2 (empty), 1, 2, 2
    cu = torch.tensor([0] + lengths).cumsum(0)
    h, d, t = 3, 8, sum(lengths)
    qkv = torch.randn(1, t, 3, h, d).permute(2, 0, 3, 1, 4)  # strided like a model's q, k, v
    q, k, v = qkv.unbind(0)
    cap = max(lengths)
    want = ref.varlen_attention_padded(q, k, v, cu, cu, cap, cap, 0.4)
    torch.testing.assert_close(ref.varlen_attention_segments(q, k, v, cu, cu, 0.4), want)
    # gated heads: all on, none, and every mix, within runs and across them
    heads = torch.rand(len(lengths), h) < 0.6
    heads[0] = heads[1] = heads[2] = True  # a run with every head on
    heads[4] = False  # a run with one image off entirely
    heads[9], heads[10] = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    heads[11] = heads[12] = torch.tensor([True, False, True])  # a run sharing one pattern with a gap: views
    for gates in (heads, torch.ones_like(heads), torch.zeros_like(heads)):
        got = ref.head_attention_segments(q, k, v, gates, 0.4, cu)
        torch.testing.assert_close(got, ref.head_attention(q, k, v, gates, 0.4, None, cu, cap))
        per_image = torch.repeat_interleave(gates, torch.tensor(lengths), dim=0).T[None, :, :, None]
        torch.testing.assert_close(got, torch.where(per_image, want, 0))
    # dense tokens with a key bias: runs of images sharing a head pattern, against every head computed and masked
    qd, kd, vd = torch.randn(3, len(lengths), 6, h, d).permute(0, 1, 3, 2, 4).unbind(0)  # strided [B, H, N, D]
    bias = torch.zeros(len(lengths), 1, 1, 6).masked_fill(torch.rand(len(lengths), 1, 1, 6) < 0.3, float("-inf"))
    bias[..., 0] = 0
    full = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bias, scale=0.4)
    got = ref.head_attention_segments(qd, kd, vd, heads, 0.4, None, bias)
    torch.testing.assert_close(got, torch.where(heads[:, :, None, None], full, 0))
    torch.testing.assert_close(got, ref.head_attention(qd, kd, vd, heads, 0.4, bias))


def test_head_attention_and_gate_rows_ops():
    tk = torch.ops.tokenopt
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8) for _ in range(3))
    heads = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, False]])
    bias = torch.zeros(3, 1, 1, 7).masked_fill(torch.rand(3, 1, 1, 7) < 0.3, float("-inf"))
    bias[..., 0] = 0
    out = tk.head_attention(q, k, v, heads, 0.3, bias)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, torch.where(heads[:, :, None, None], full, 0))
    # packed: images of 5, 0 and 3 tokens, each over its own
    cu = torch.tensor([0, 5, 5, 8])
    qp, kp, vp = (torch.randn(1, 4, 8, 8) for _ in range(3))
    got = tk.head_attention(qp, kp, vp, heads, 0.3, None, cu, 5)
    for b, (lo, hi) in enumerate([(0, 5), (5, 5), (5, 8)]):
        want = F.scaled_dot_product_attention(qp[:, :, lo:hi], kp[:, :, lo:hi], vp[:, :, lo:hi], scale=0.3)
        torch.testing.assert_close(got[:, :, lo:hi], torch.where(heads[b][None, :, None, None], want, 0))
    torch.testing.assert_close(tokenopt.kernels.reference.head_attention(qp, kp, vp, heads, 0.3, None, cu, 5), got)
    rows, images, cu_sub = tk.gate_rows(torch.tensor([True, False, True]), cu)
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and images.tolist() == [0, 2] and cu_sub.tolist() == [0, 5, 8]
    rows, images, cu_sub = tk.gate_rows(torch.tensor([False, True, True]), cu)
    assert rows.tolist() == [5, 6, 7] and images.tolist() == [1, 2] and cu_sub.tolist() == [0, 0, 3]
    rows, images, _ = tk.gate_rows(torch.tensor([False, True, False]), None)
    assert rows.tolist() == [1] and images.tolist() == [1]
    rows, images, cu_sub = tk.gate_rows(torch.ones(3, dtype=torch.bool), cu)  # every image: every row
    assert rows.tolist() == list(range(8)) and images.tolist() == [0, 1, 2] and cu_sub.tolist() == cu.tolist()
    # take_rows / add_rows: index_select / index_add, and the plain copy / sum when the rows are all of x
    xs, br = torch.randn(1, 8, 5), torch.randn(1, 3, 5)
    some = torch.tensor([1, 4, 6])
    torch.testing.assert_close(tk.take_rows(xs, 1, some), xs.index_select(1, some))
    torch.testing.assert_close(tk.add_rows(xs, 1, some, br), xs.index_add(1, some, br))
    every, full = torch.arange(8), torch.randn(1, 8, 5)
    taken = tk.take_rows(xs, 1, every)
    assert torch.equal(taken, xs) and taken.data_ptr() != xs.data_ptr()  # a fresh tensor, as custom ops return
    torch.testing.assert_close(tk.add_rows(xs, 1, every, full), xs.index_add(1, every, full))
    idx, valid = tk.keep_select(torch.tensor([[True, False, True], [False, False, False]]), 1)
    assert idx[valid].tolist() == [0, 1, 3, 0] and valid.tolist() == [[True, True, True, False], [True, False, False, False]]
    for op, args in ((tk.head_attention, (q, k, v, heads, 0.3, bias)), (tk.gate_rows, (heads[:, 0], cu)),
                     (tk.take_rows, (xs, 1, some)), (tk.add_rows, (xs, 1, some, br)),
                     (tk.gumbel_gate, (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), 5.0, 0.5))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_calibrate_usage_matches_inference_use_to_training_use():
    """``calibrate_usage`` shifts each gate so that, on the calibration images, the share on at inference
    equals the share on in training (``mean sigmoid(logit)``): read back independently from the executed
    graph (``gate_usage``, token counts); the inference graph built from the calibrated weights equals the
    training module in eval mode; bad input is refused."""
    from tokenopt.policies.adavit import GateNet, calibrate_usage
    from tokenopt.train import TrainConfig, build_model

    torch.manual_seed(0)
    model = build_model(TrainConfig(depth=4, embed_dim=32)).eval()
    images = torch.randn(200, 1, 28, 28)
    config = tokenopt.AdaViT(token_blocks=(1, 2))
    net = tokenopt.prepare_training(model, policy=config, example_inputs=(images[:2],))
    with torch.no_grad():  # logits around +1: training would use ~70% of each gate, inference ~100%
        for m in net.modules():
            if isinstance(m, GateNet):
                m.fc.weight.normal_(0, 0.1)
                m.fc.bias.fill_(1.0)
    net.eval()
    gm = tokenopt.optimize(model, policy=config, example_inputs=(images[:2],), policy_state=net.policy_state_dict())
    before = tokenopt.gate_usage(gm, images)[1]
    assert before["mlp"].float().mean() > 0.95  # the mismatch being fixed
    report = calibrate_usage(net, images)
    assert len(report) == 3 * (4 + 2) + 2  # blocks 1-3: 4 heads + 2 sub-layers; two token stages
    for r in report:
        assert abs(r["after"] - r["expected"]) <= 0.01 and 0.2 < r["expected"] < 0.98, r
    gm = tokenopt.optimize(model, policy=config, example_inputs=(images[:2],), policy_state=net.policy_state_dict())
    used = tokenopt.gate_usage(gm, images)[1]  # block 1: its gates see the ungated block 0's output
    first = {r["output"]: r["expected"] for r in report if r["module"] == "tokenopt_adavit.gate1"}
    assert abs(used["attn"].float().mean() - first[4]) <= 0.01 and abs(used["mlp"].float().mean() - first[5]) <= 0.01
    counts = tokenopt.token_counts(gm, images)
    kept1, kept2 = counts[1].float() - 1, counts[2].float() - 1  # patch tokens after each token stage
    stages = [r["expected"] for r in report if r["module"].startswith("tokenopt_adavit.tokens")]
    assert abs(kept1.mean() / 196 - stages[0]) <= 0.01
    assert abs(kept2.sum() / kept1.sum() - stages[1]) <= 0.01  # of the tokens still there (not the padding)
    with torch.no_grad():
        torch.testing.assert_close(gm(images[:16]), net(images[:16]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        calibrate_usage(net, images[:0])
    with pytest.raises(ValueError, match="kinds of gate"):
        calibrate_usage(net, images, shares={"blocks": 0.5})
    with pytest.raises(ValueError, match="no AdaViT decision networks"):
        calibrate_usage(tokenopt.optimize(model, policy="topk", example_inputs=(images[:2],)), images)
