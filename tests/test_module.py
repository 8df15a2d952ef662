"""The optimized model as a deployable artefact: module behaviour, weights of its own, keyword calls,
save/load, ONNX, batch sizes, the batch-size rule, dense outputs, Hugging Face pipelines, input checks."""

import os
import zipfile

import pytest
import timm
import torch

import tokenopt
from tests.reference_models import Policy, _timm_blocks, run_blocks

CASES = {
    "none": dict(policy="none"),
    "topk": dict(policy="topk", blocks=(1, 2)),
    "tome": dict(policy="tome", r=12),
    "ats": dict(policy="ats", blocks=(1,)),
    "ats padded": dict(policy="ats", blocks=(1,), mode="padded"),
    "composite": dict(policy=[tokenopt.TopK(blocks=(1,)), tokenopt.ToMe(r=8, blocks=(2, 3))]),
}


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in model.state_dict().items())


# -- a real module, on weights of its own ------------------------------------------------------------------
def test_module_methods_leave_the_users_model_bitwise_unchanged(deit):
    before = _state(deit)
    flags = [p.requires_grad for p in deit.parameters()]
    gm = tokenopt.optimize(deit, policy="topk", blocks=(1,))
    assert isinstance(gm, tokenopt.OptimizedModule) and isinstance(gm, torch.fx.GraphModule)
    assert gm.training is False
    x = torch.randn(3, 3, 224, 224)
    want = gm(x)
    gm.train()
    assert gm.training and all(m.training for m in gm.modules())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(x).square().mean().backward()
    opt.step()
    gm.half()
    assert gm.dtype == torch.float16 and gm(x.half()).dtype == torch.float16
    gm.requires_grad_(False)
    assert not any(p.requires_grad for p in gm.parameters())
    assert _same_state(deit, before) and [p.requires_grad for p in deit.parameters()] == flags
    # state_dict / load_state_dict: the original weights back, and the original outputs
    gm.float().eval()
    gm.load_state_dict(deit.state_dict())
    torch.testing.assert_close(gm(x), want, atol=0, rtol=0)
    assert _same_state(deit, before)


def test_share_weights_shares_on_request(deit):
    gm = tokenopt.optimize(deit, policy="none", share_weights=True)
    own = {id(p) for p in deit.parameters()}
    assert {id(p) for p in gm.parameters()} <= own
    with pytest.raises(ValueError, match="share_weights must be True or False"):
        tokenopt.optimize(deit, policy="none", share_weights="yes")


def test_deepcopy_and_pickle(deit):
    import copy
    import pickle

    gm = tokenopt.optimize(deit, policy="tome", r=12)
    twin = copy.deepcopy(gm)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(twin(x), gm(x))
    assert {id(p) for p in twin.parameters()}.isdisjoint({id(p) for p in gm.parameters()})
    assert {k: v.tolist() for k, v in tokenopt.token_counts(twin, x).items()} == \
        {k: v.tolist() for k, v in tokenopt.token_counts(gm, x).items()}
    back = pickle.loads(pickle.dumps(gm))  # tokenopt's archive inside: weights and graph, content-hashed
    assert torch.equal(back(x), gm(x))


# -- drop-in: keyword inputs, carried attributes, input checks ---------------------------------------------------
def test_keyword_inputs_and_runner_attributes(deit):
    gm = tokenopt.optimize(deit, policy="tome", r=12)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(gm(x=x), gm(x))
    with pytest.raises(TypeError, match="unexpected keyword 'pixel_values'"):
        gm(pixel_values=x)
    with pytest.raises(TypeError, match="by position and by keyword"):
        gm(x, x=x)
    assert gm.num_classes == deit.num_classes and gm.pretrained_cfg == deit.pretrained_cfg
    assert gm.device == torch.device("cpu") and gm.dtype == torch.float32


def test_bad_inputs_get_clear_errors(deit):
    gm = tokenopt.optimize(deit, policy="topk", blocks=(1,))
    with pytest.raises(ValueError, match="add the batch dimension"):
        gm(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match=r"built for \[batch, 3, 224, 224\]"):
        gm(torch.randn(2, 3, 256, 256))
    with pytest.raises(TypeError, match="model runs in torch.float32"):
        gm(torch.randn(2, 3, 224, 224, dtype=torch.float64))
    assert gm(torch.randn(0, 3, 224, 224)).shape == (0, 1000)  # an empty batch: an empty answer


# -- any batch size, from a batch-2 or a batch-1 example ------------------------------------------------------------
@pytest.mark.parametrize("example_batch", [1, 2])
def test_any_batch_size(deit, example_batch):
    ex = (torch.randn(example_batch, 3, 224, 224),)
    plain = tokenopt.optimize(deit, policy="none", example_inputs=ex)
    reduced = tokenopt.optimize(deit, policy="topk", blocks=(1,), example_inputs=ex)
    xs = torch.randn(64, 3, 224, 224)
    with torch.no_grad():
        full_model, full_reduced = deit(xs), reduced(xs)
        for b in (1, 2, 3, 8, 64):
            torch.testing.assert_close(plain(xs[:b]), full_model[:b], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(reduced(xs[:b]), full_reduced[:b], atol=1e-5, rtol=1e-5)


# -- never slower: the batch-size rule -----------------------------------------------------------------------------
def test_below_min_batch_the_original_graph_runs(deit):
    gm = tokenopt.optimize(deit, policy="tome", r=12, min_batch=4)
    reduced = tokenopt.optimize(deit, policy="tome", r=12)
    x = torch.randn(6, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(gm(x[:3]), deit(x[:3]))  # below the threshold: exactly the original
        assert torch.equal(gm(x), reduced(x))  # at or above it: the reduced graph
        assert not torch.equal(gm(x[:3]), reduced(x[:3]))
    assert gm.meta["tokenopt.min_batch"] == 4
    gm.half()  # one set of weights serves both paths
    assert gm.original_graph.get_parameter("pos_embed").dtype == torch.float16
    with pytest.raises(ValueError, match="min_batch must be"):
        tokenopt.optimize(deit, policy="tome", min_batch=0)


def test_min_batch_auto_measures_and_records(deit, monkeypatch):
    monkeypatch.setattr(tokenopt.module, "AUTO_BATCHES", (1, 2, 4, 8))  # (the full range: benchmarks/)
    gm = tokenopt.optimize(deit, policy="tome", r=12, min_batch="auto")
    timings = gm.meta["tokenopt.min_batch_timings"]
    assert timings and all(g > 0 for g in timings.values())
    wins = [b for b, g in timings.items() if g > 1]
    assert gm.min_batch == gm.meta["tokenopt.min_batch"]
    # the threshold is the smallest measured size from which the reduced graph won at every size after it
    later = [b for b in timings if b >= gm.min_batch]
    assert all(timings[b] > 1 for b in later) and (gm.min_batch > max(timings) or gm.min_batch in wins)
    assert set(timings) <= {1, 2, 4, 8}


# -- save and load -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_save_load_round_trip(deit, case, tmp_path):
    gm = tokenopt.optimize(deit, **CASES[case])
    path = tmp_path / "m.pt2"
    tokenopt.save(gm, path)
    back = tokenopt.load(path)
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(back(x), gm(x)) and torch.equal(back(x[:1]), gm(x[:1]))
    assert repr(back.meta["tokenopt.policy"]) == repr(gm.meta["tokenopt.policy"])
    assert {k: v.tolist() for k, v in tokenopt.token_counts(back, x).items()} == \
        {k: v.tolist() for k, v in tokenopt.token_counts(gm, x).items()}
    assert back.meta["tokenopt.model_info"].num_tokens == 197 and len(back.meta["tokenopt.model_info"].blocks) == 4
    assert back.num_classes == 1000 and not back.training
    assert [f for f in os.listdir(tmp_path) if f != "m.pt2"] == []  # no temporary file left


def test_save_load_keeps_the_batch_rule(deit, tmp_path):
    gm = tokenopt.optimize(deit, policy="tome", r=12, min_batch=4)
    tokenopt.save(gm, tmp_path / "m.pt2")
    back = tokenopt.load(tmp_path / "m.pt2")
    x = torch.randn(5, 3, 224, 224)
    with torch.no_grad():
        assert back.min_batch == 4 and torch.equal(back(x[:2]), deit(x[:2])) and torch.equal(back(x), gm(x))


def test_failed_save_leaves_an_existing_file_intact(deit, tmp_path, monkeypatch):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"precious")
    gm = tokenopt.optimize(deit, policy="tome", r=12)
    import torch.export.pt2_archive._package as package

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(package, "package_pt2", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        tokenopt.save(gm, path)
    assert path.read_bytes() == b"precious" and os.listdir(tmp_path) == ["model.pt2"]


def test_load_refuses_foreign_and_incompatible_files(deit, tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(tokenopt.LoadError, match="not a tokenopt archive"):
        tokenopt.load(junk)
    plain = tmp_path / "plain.pt2"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("archive/data.txt", "x")
    with pytest.raises(tokenopt.LoadError, match="no tokenopt.json"):
        tokenopt.load(plain)
    gm = tokenopt.optimize(deit, policy="none")
    good = tmp_path / "good.pt2"
    tokenopt.save(gm, good)
    newer = tmp_path / "newer.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("tokenopt.json"):
                data = data.replace(b'"format": 2', b'"format": 99')
            dst.writestr(item, data)
    with pytest.raises(tokenopt.LoadError, match="archive format 99"):
        tokenopt.load(newer)


# -- ONNX -----------------------------------------------------------------------------------------------------
ONNX_CASES = {
    "topk": CASES["topk"], "tome": CASES["tome"], "composite": CASES["composite"],
    "pitome": dict(policy="pitome", r=10),
    "pitome composite": dict(policy=[tokenopt.TopK(blocks=(1,)), tokenopt.PiToMe(r=8, blocks=(2, 3))]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ONNX_CASES)
def test_export_onnx_dynamic_batch(deit, case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gm = tokenopt.optimize(deit, **ONNX_CASES[case], min_batch=3)  # (the batch rule is not part of the export)
    path = tokenopt.export_onnx(gm, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, 224, 224)
        x[0, :, :112] = 0.5  # flat regions: identical patches, tied scores (ties go to the lower index)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = torch.fx.GraphModule.__call__(gm, x)  # the reduced graph itself
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_export_onnx_refuses_adaptive_policies(deit, tmp_path):
    gm = tokenopt.optimize(deit, policy="ats", blocks=(1,), mode="padded")
    with pytest.raises(ValueError, match="ats decides per-image token counts"):
        tokenopt.export_onnx(gm, tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)


# -- dense outputs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_tokens():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, num_classes=0, global_pool="").eval()


def test_token_output_needs_dense(deit_tokens):
    with pytest.raises(tokenopt.passes.realize.RewriteError, match="dense=True"):
        tokenopt.optimize(deit_tokens, policy="tome", r=8)


def test_dense_restore_with_nothing_dropped_equals_the_model(deit_tokens):
    gm = tokenopt.optimize(deit_tokens, policy="topk", keep_rate=1.0, blocks=(1, 2), dense=True)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), deit_tokens(x), atol=1e-5, rtol=1e-5)


DENSE = {
    "topk": (dict(policy="topk", blocks=(1, 2)), Policy("topk", blocks=(1, 2))),
    "tome": (dict(policy="tome", r=12), Policy("tome", blocks=(0, 1, 2, 3), r=12)),
    "ats": (dict(policy="ats", blocks=(1,)), Policy("ats", blocks=(1,))),
    "prune then merge": (dict(policy=[tokenopt.TopK(blocks=(1,)), tokenopt.ToMe(r=8, blocks=(2, 3))]),
                         [Policy("topk", blocks=(1,)), Policy("tome", blocks=(2, 3), r=8)]),
}


@pytest.mark.parametrize("mode", ["padded", "masked"])
@pytest.mark.parametrize("case", DENSE)
def test_dense_restore_against_the_eager_reference(deit_tokens, case, mode):
    options, pol = DENSE[case]
    gm = tokenopt.optimize(deit_tokens, dense=True, mode=mode, **options)
    m = deit_tokens
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        tokens = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        grid = []
        run_blocks(_timm_blocks(m), tokens, m.num_prefix_tokens, pol, grid_out=grid)
        want = m.norm(grid[0])
        got = gm(x)
    assert got.shape == (3, 197, 192)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_dense_refuses_packed(deit_tokens):
    with pytest.raises(tokenopt.passes.realize.RewriteError, match="mode='padded'"):
        tokenopt.optimize(deit_tokens, policy="ats", mode="packed", dense=True)


# -- Hugging Face pipeline --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_classifier():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
                                 image_size=64, patch_size=8, num_labels=5)
    model = transformers.ViTForImageClassification(cfg).eval()
    processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    return model, processor


@pytest.mark.parametrize("policy", ["none", "topk", "tome", "ats"])
def test_hugging_face_pipeline_drop_in(hf_classifier, policy):
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    model, processor = hf_classifier
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (70 + 5 * i, 80, 3), dtype=np.uint8)) for i in range(3)]
    want = pipeline("image-classification", model=model, image_processor=processor)(images)
    options = {"topk": dict(blocks=(1,)), "tome": dict(r=8), "ats": dict(blocks=(1,))}.get(policy, {})
    gm = tokenopt.optimize(model, policy=policy, **options)
    got = pipeline("image-classification", model=gm, image_processor=processor)(images)
    assert len(got) == 3 and all(len(g) == 5 for g in got)
    if policy == "none":
        assert got == want
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert torch.equal(gm(pixel_values=pixels).logits, gm(pixels).logits)
    assert gm.config is model.config or gm.config.to_dict() == model.config.to_dict()


# -- image sizes -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deit_dynamic():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, dynamic_img_size=True).eval()


def test_dynamic_image_size_model_at_two_sizes(deit_dynamic, tmp_path):
    from tests.reference_models import timm_forward

    m = deit_dynamic
    plain = tokenopt.optimize(m, policy="none")
    gm = tokenopt.optimize(m, policy="tome", r=8)
    with torch.no_grad():
        for size in ((224, 224), (256, 192)):
            x = torch.randn(3, 3, *size)
            torch.testing.assert_close(plain(x), m(x), atol=1e-5, rtol=1e-5)
            want, counts = timm_forward(m, x, Policy("tome", blocks=(0, 1, 2, 3), r=8))
            torch.testing.assert_close(gm(x), want, atol=1e-4, rtol=1e-4)
        assert list(gm.variants) == [(256, 192)]
        assert tokenopt.token_counts(gm.variants[(256, 192)], x)[3].tolist() == counts[3].tolist() == [161] * 3
        # the new size's graph uses the module's weights: a change to gm reaches it
        gm.get_parameter("head.bias").data += 1.0
        torch.testing.assert_close(gm(x), want + 1.0, atol=1e-4, rtol=1e-4)
        gm.get_parameter("head.bias").data -= 1.0
        # and a saved model builds other sizes after loading
        tokenopt.save(gm, tmp_path / "m.pt2")
        back = tokenopt.load(tmp_path / "m.pt2")
        assert torch.equal(back(x), gm(x)) and list(back.variants) == [(256, 192)]


def test_dense_head_example_runs(capsys):
    from tests.models import run_example

    run_example("dense_head")
    out = capsys.readouterr().out
    assert "output (4, 5, 14, 14)" in out and "tokens per block: [189," in out
