"""The benchmark scripts run end to end (tiny settings; the speed targets live in the scripts' output,
not in tests)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_policies_runs_and_writes_json(tmp_path):
    out = tmp_path / "b.json"
    _load("bench_policies").main(["--model", "deit_tiny_patch16_224", "--depth", "6", "--batch", "2", "--rounds", "1", "--threads", "1",
                                  "--policies", "ats", "ats:padded", "tome", "--json", str(out)])
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["results"]]
    assert names == ["eager", "graph, no reduction", "ats", "ats:padded", "tome"]
    by = {r["name"]: r for r in data["results"]}
    assert by["graph, no reduction"]["flops_ratio"] == 1.0
    assert by["tome"]["flops_ratio"] < 0.85 and by["ats"]["mean_tokens"] < 197  # (6 blocks: ToMe r=13 merges 78 tokens)


def test_bench_varlen_attention_checks_every_implementation(capsys):
    _load("bench_varlen_attention").main(["--batch", "3", "--heads", "2", "--head-dim", "8", "--min-len", "1",
                                          "--max-len", "9", "--rounds", "1"])
    out = capsys.readouterr().out
    for name in ("loop", "padded", "bucketed"):
        assert f"  {name}" in out


def test_bench_kernels_check_compares_every_fused_op(capsys):
    # conftest set TRITON_INTERPRET=1: --check runs the Triton ops on the CPU interpreter in-process
    assert _load("bench_kernels").main(["--check"]) == 0
    out = capsys.readouterr().out
    for name in ("ats_select_dense", "ats_select_packed", "topk_gather", "tome_merge", "gather_packed",
                 "unpack_padded", "varlen_attention"):
        assert f"batch 3: {name}: fused == reference" in out


def test_bench_kernels_without_a_gpu_says_so(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script times instead")
    assert _load("bench_kernels").main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_deploy_runs_and_writes_json(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("onnxruntime")
    import tokenopt

    monkeypatch.setattr(tokenopt.module, "AUTO_BATCHES", (1, 2))
    out = tmp_path / "d.json"
    _load("bench_deploy").main(["--model", "deit_tiny_patch16_224", "--depth", "2", "--batch", "2", "--rounds", "1",
                                "--onnx-policies", "topk", "--threshold-policies", "topk", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data["onnx"]["topk"]) == {"eager", "torch", "ort"} and all(v > 0 for v in data["onnx"]["topk"].values())
    assert data["min_batch"]["topk"]["threshold"] in (1, 2, 3) and set(data["min_batch"]["topk"]["gains"]) <= {"1", "2"}


def test_survey_models_reports_each_cell(tmp_path, capsys):
    out = tmp_path / "s.json"
    survey = _load("survey_models")
    assert survey.main(["--only", "hand/sdpa", "hand/talking_heads", "hand/mha_weights", "--policies", "none", "tome",
                        "ats", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = {name: {p: c["outcome"] for p, c in r["cells"].items()} for name, r in data.items()}
    assert cells == {
        "hand/sdpa": {"none": "equal", "tome": "reduced", "ats": "reduced"},
        "hand/talking_heads": {"none": "equal", "tome": "reduced", "ats": "refused"},
        "hand/mha_weights": {"none": "equal", "tome": "refused", "ats": "refused"},
    }
    assert 0.3 < data["hand/sdpa"]["cells"]["tome"]["flops_ratio"] < 0.9
    text = capsys.readouterr().out
    assert "| hand/talking_heads |" in text and "mixes its heads around the softmax" in text


def test_survey_models_learned_checks_the_three_forms_against_each_other(tmp_path, capsys):
    out = tmp_path / "s.json"
    survey = _load("survey_models")
    assert survey.main(["--learned", "--only", "hand/sdpa", "hand/mha", "--policies", "dynamicvit", "sait",
                        "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cells = {name: {p: c["outcome"] for p, c in r["cells"].items()} for name, r in data.items()}
    assert cells == {"hand/sdpa": {"dynamicvit": "reduced", "sait": "reduced"},
                     "hand/mha": {"dynamicvit": "refused", "sait": "refused"},  # (--only takes prefixes)
                     "hand/mha_weights": {"dynamicvit": "refused", "sait": "refused"}}
    for cell in data["hand/sdpa"]["cells"].values():  # the inference graph equals the masked eval graph
        assert cell["max_abs_diff_vs_masked"] <= 1e-3 and cell["flops_ratio"] < 0.99
    assert "runs sequence-first" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        survey.main(["--learned", "--policies", "tome"])


def test_bench_learned_reads_a_runs_folder_with_inference_options(tmp_path, capsys):
    """``--runs`` finds the runs of ``scripts/train_learned.sh`` (a missing one is skipped and said);
    ``--set POLICY.KEY=VALUE`` overrides a trained run's inference option, named in its row."""
    import os

    import pytest

    from tokenopt.fidelity import FASHION_MNIST_ROOT
    from tokenopt.train import parse_args, train

    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Fashion-MNIST not installed (scripts/dev installs it)")
    small = ["--train-images", "128", "--test-images", "64", "--batch", "64", "--depth", "2", "--embed-dim", "32",
             "--epochs", "1", "--warmup-steps", "1", "--no-progress"]
    train(parse_args(["--out", str(tmp_path / "base"), *small]), progress=False)
    train(parse_args(["--out", str(tmp_path / "avit"), "--policy", "avit", "--init", str(tmp_path / "base" / "model.pt"),
                      *small]), progress=False)
    bench = _load("bench_learned")
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(tmp_path), "--set", "eps=0.001"])  # no POLICY. prefix
    out = tmp_path / "t.json"
    bench.main(["--runs", str(tmp_path), "--set", "avit.eps=0.001", "--test-images", "64", "--batch", "8", "--rounds", "1",
                "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rows["tune_malloc"] is False
    assert set(rows["rows"]) == {"base (no reduction)", "ATS (max 0.5)", "ToMe (r=16)", "A-ViT (eps 0.001)"}
    assert [s.split(" ")[0] for s in rows["skipped"]] == ["AdaViT", "SaiT", "DynamicViT"]
    assert rows["rows"]["base (no reduction)"]["flops_ratio"] == 1.0
    assert rows["timing_batches"] == 4 and rows["rounds"] == 1  # four distinct batches of 8 timed per round
    for row in rows["rows"].values():  # one round: its ratio is the whole range
        low, high = row["throughput_ratio_rounds"]
        assert low == high == pytest.approx(row["throughput_ratio"])
    with pytest.raises(SystemExit):  # 4 batches of 32 > 64 test images
        bench.main(["--runs", str(tmp_path), "--test-images", "64", "--batch", "32", "--rounds", "1", "--json", ""])
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(tmp_path), "--set", "sait.density=0.5", "--test-images", "64", "--rounds", "1",
                    "--json", ""])  # no SaiT run here to apply it to
    capsys.readouterr()


def test_bench_learned_tune_malloc_sets_glibc_in_its_own_process():
    """``--tune-malloc`` changes the allocator of the process it runs in: checked in a child process, so this
    test session keeps glibc's defaults."""
    import subprocess

    code = ("import importlib.util as u; s = u.spec_from_file_location('b', 'benchmarks/bench_learned.py'); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.tune_malloc(); print('tuned')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "tuned", done.stderr


def test_bench_adavit_gates_sets_the_use_it_is_asked_for(tmp_path):
    def run(heads, layers, tokens):
        out = tmp_path / "g.json"
        _load("bench_adavit_gates").main(["--embed-dim", "32", "--depth", "3", "--heads", "2", "--mlp-ratio", "2",
                                          "--batch", "8", "--rounds", "1", "--threads", "1", "--heads-on", heads,
                                          "--layers-on", layers, "--tokens-on", tokens, "--json", str(out)])
        return json.loads(out.read_text())

    data = run("0.5", "1", "0.5")
    assert data["heads_per_gated_block"] == 1.0 and data["sub_layers_per_gated_block"] == 2.0  # half of 2 heads
    assert data["tokens_after_each_block"][0] == 1 + 98  # block 0's token stage keeps half of 196 patches
    assert data["flops_ratio"] < 0.7 and data["throughput_ratio"] > 0
    data = run("1", "0.75", "1")
    assert data["sub_layers_per_gated_block"] == 1.5 and data["heads_per_gated_block"] == 1.5  # 6 of 8 images
    assert data["tokens_after_each_block"] == [197.0] * 3


def test_probe_selection_keeping_every_token_is_the_model_and_its_oracle_path_is_topk(tmp_path, capsys):
    """Keeping all 196 patches, every criterion gives the unpruned accuracy; at each K the script's own check
    (its score-buffer path at the pruning block gives ``tokenopt.TopK``'s logits) passes, or it exits."""
    import os

    import pytest

    from tokenopt.fidelity import FASHION_MNIST_ROOT
    from tokenopt.train import parse_args, train

    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Fashion-MNIST not installed (scripts/dev installs it)")
    train(parse_args(["--out", str(tmp_path / "base"), "--train-images", "256", "--test-images", "64", "--batch", "64",
                      "--depth", "3", "--embed-dim", "32", "--epochs", "1", "--warmup-steps", "1", "--no-progress"]),
          progress=False)
    out = tmp_path / "p.json"
    probe = _load("probe_selection")
    with pytest.raises(SystemExit):
        probe.main(["--run", str(tmp_path / "base"), "--block", "2", "--json", str(out)])  # the last block
    probe.main(["--run", str(tmp_path / "base"), "--block", "1", "--keep", "196,20", "--images", "100", "--batch", "50",
                "--seeds", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    everything, few = data["rows"]
    assert set(everything) == {"keep", "cls@1", "cls@2", "random"}
    assert all(everything[k] == data["base"] for k in ("cls@1", "cls@2", "random"))
    assert few["keep"] == 20 and all(0 <= few[k] <= 1 for k in ("cls@1", "cls@2", "random"))
    assert "| 20 |" in capsys.readouterr().out
    true_scores = probe.cls_attention  # the check catches a score path that keeps other tokens than top-k
    probe.cls_attention = lambda *a: {b: -v for b, v in true_scores(*a).items()}
    try:
        with pytest.raises(SystemExit, match="differs from TopK"):
            probe.main(["--run", str(tmp_path / "base"), "--block", "1", "--keep", "20", "--images", "50",
                        "--batch", "50", "--seeds", "1", "--json", str(out)])
    finally:
        probe.cls_attention = true_scores


def test_probe_operating_points_proxy_is_the_model_unpruned_and_ranks_by_the_graphs_cls_attention():
    """DynamicViT's operating-point proxy: with no pruning it is the model; its CLS attention equals the one
    read off the captured graph's q and k (``probe_selection.cls_attention``); its token counts are
    ``DynamicViT``'s graph's at the same point."""
    import timm
    import torch

    import tokenopt

    probe = _load("probe_operating_points")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
                              num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, counts = probe.pruned_logits(model, x, 1.0, ())
    assert torch.allclose(logits, model(x), atol=1e-5) and counts == [65] * 4
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for block in model.blocks[:2]:
        h = block(h)
    dense = tokenopt.optimize(model, policy="none", example_inputs=(x,))
    reference = _load("probe_selection").cls_attention(dense, x, [2])[2][:, 0, 1:]
    assert torch.allclose(probe.cls_attention(model.blocks[2], h), reference, atol=1e-5)
    logits, counts = probe.pruned_logits(model, x, 0.5, (1, 2))
    assert counts == [65, 65, 33, 17] and logits.shape == (3, 10)
    gm = tokenopt.optimize(model, policy=tokenopt.DynamicViT(rho=0.5, blocks=(1, 2)), example_inputs=(x,))
    assert [int(c.float().mean()) for c in tokenopt.token_counts(gm, x).values()] == counts
    assert probe.parse_points("0.5@2,3 0.4@2") == [(0.5, (2, 3)), (0.4, (2,))]
    with pytest.raises(SystemExit, match="RHO@BLOCK"):
        probe.parse_points("0.5")


def test_probe_dynamicvit_gradients_reads_the_whole_task_gradient_at_the_predictors_output():
    """The per-token gradients the probe reports are all of the task gradient the predictor gets: summed over
    the tokens they are autograd's gradient on ``fc3``'s keep bias (the same Gumbel noise); the
    ratio gradient is per unit weight (the same at weights 2 and 200); the spread's numbers are right."""
    import timm
    import torch
    import torch.nn.functional as F

    import tokenopt
    from tokenopt.train import distillation

    probe = _load("probe_dynamicvit_gradients")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4,
                              num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    teacher = F.log_softmax(model(x).detach(), -1)
    found = {}
    for weight in (2.0, 200.0):
        torch.manual_seed(1)
        tm = tokenopt.prepare_training(model, tokenopt.DynamicViT(rho=0.5, blocks=(1, 2), ratio_weight=weight),
                                       example_inputs=(x[:2],))
        torch.manual_seed(2)  # (the same Gumbel noise for both weights)
        found[weight] = probe.predictor_gradients(tm, x, y, teacher, 0.5, weight)
    r = found[2.0]
    assert sorted(r) == ["predictor0", "predictor1"]
    assert abs(r["predictor0"]["ratio"] - found[200.0]["predictor0"]["ratio"]) <= 1e-5 * r["predictor0"]["ratio"]
    # the per-token gradients on the keep logit sum to autograd's gradient on fc3's keep bias
    torch.manual_seed(1)
    tm = tokenopt.prepare_training(model, tokenopt.DynamicViT(rho=0.5, blocks=(1, 2), ratio_weight=2.0),
                                   example_inputs=(x[:2],))
    pred = dict(tm.named_modules())["tokenopt_dynamicvit.predictor0"]
    torch.manual_seed(2)
    logits = tm(x).float()
    task = F.cross_entropy(logits, y) + distillation(logits, teacher, 0.5)
    (bias_grad,) = torch.autograd.grad(task, [pred.fc3.bias])
    assert bias_grad.abs().max() > 0
    assert torch.allclose(r["predictor0"]["tokens"].sum(), bias_grad[0], atol=1e-7, rtol=1e-4)
    s = probe.spread(torch.tensor([[1.0] * 99 + [-901.0]]))
    assert s["median"] == 1.0 and s["p99"] == 1.0 and s["max"] == 901.0 and abs(s["top1%"] - 0.901) < 1e-6
