"""The training entry point: resume reproduces the uninterrupted run; two processes under torchrun
(gloo) give the loss of one process on the same global batch. Tiny settings (the recipe: README)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tokenopt.fidelity import FASHION_MNIST_ROOT

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")),
                                reason="Fashion-MNIST not installed (scripts/dev installs it)")

TINY = ["--train-images", "256", "--test-images", "100", "--batch", "64", "--depth", "2", "--embed-dim", "32",
        "--warmup-steps", "2", "--policy", "avit", "--set", "beta=3.0", "--set", "prior_weight=0.0", "--no-progress"]


def _log(path):
    with open(os.path.join(path, "log.json")) as f:
        return json.load(f)["epochs"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    from tokenopt.train import TrainConfig, parse_args, train

    straight = parse_args(["--out", str(tmp_path / "a"), "--epochs", "2", *TINY])
    train(straight, progress=False)
    cut = parse_args(["--out", str(tmp_path / "b"), "--epochs", "2", *TINY])
    cut.stop_after_epoch = 1
    train(cut, progress=False)
    assert len(_log(tmp_path / "b")) == 1
    resumed = parse_args(["--out", str(tmp_path / "b"), "--epochs", "2", "--resume", *TINY])
    train(resumed, progress=False)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and la[1]["test_accuracy"] == lb[1]["test_accuracy"]
    assert isinstance(TrainConfig(), TrainConfig)


def test_two_processes_under_torchrun_match_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed")
    args = ["--epochs", "1", *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "tokenopt.train",
                    "--out", str(tmp_path / "ddp"), *args], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "tokenopt.train", "--out", str(tmp_path / "one"), *args], check=True,
                   env=env, capture_output=True, timeout=600)
    ddp, one = _log(tmp_path / "ddp")[0], _log(tmp_path / "one")[0]
    for key in ("loss", "task", "ponder"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


@pytest.mark.parametrize("policy", ["dynamicvit", "sait"])
def test_learned_policies_train_by_the_same_entry_point(tmp_path, policy):
    """A few steps of each learned policy through ``tokenopt train`` (distilling from the --init model):
    its losses logged, its weights written, and the inference graph built from them."""
    import tokenopt
    from tokenopt.train import TrainConfig, build_model, parse_args, train

    small = ["--train-images", "128", "--test-images", "64", "--batch", "64", "--depth", "3", "--embed-dim", "32",
             "--warmup-steps", "1", "--no-progress"]
    base = parse_args(["--out", str(tmp_path / "base"), "--epochs", "1", *small])
    train(base, progress=False)
    sets = {"dynamicvit": ["--set", "blocks=(0,)"], "sait": ["--set", "train_density=0.5"]}[policy]
    cfg = parse_args(["--out", str(tmp_path / policy), "--epochs", "1", "--policy", policy, "--distill",
                      "--init", str(tmp_path / "base" / "model.pt"), *sets, *small])
    train(cfg, progress=False)
    record = _log(tmp_path / policy)[0]
    assert record["distill"] > 0 and ("ratio" in record) == (policy == "dynamicvit")
    if policy == "dynamicvit":  # the kept share in training, logged beside the losses
        assert 0 < record["train_keep1"] < 1 and "train_keep2" not in record
    has_state = os.path.exists(tmp_path / policy / "policy.pt")
    assert has_state == (policy == "dynamicvit")
    model = build_model(TrainConfig(depth=3, embed_dim=32))
    model.load_state_dict(torch.load(tmp_path / policy / "model.pt", weights_only=True), strict=True)
    x = torch.randn(3, 1, 28, 28)
    gm = tokenopt.optimize(model.eval(), policy=policy, example_inputs=(x,), **cfg.policy_options,
                           policy_state=str(tmp_path / policy / "policy.pt") if has_state else None)
    counts = tokenopt.token_counts(gm, x)
    assert counts[1].max() < 197  # fewer tokens from block 1 on
    assert record["tokens_per_block"][1] < 197


def test_a_log_file_gets_the_epochs_running_means(tmp_path, capsys):
    """Written to a file (not a terminal), the progress display prints a line every 10% of an epoch with
    the epoch's mean losses and statistics so far; the last line's means are the ones log.json records."""
    from tokenopt.train import parse_args, train

    args = ["--train-images", "640", "--test-images", "64", "--batch", "64", "--depth", "2", "--embed-dim", "32",
            "--warmup-steps", "1", "--policy", "dynamicvit", "--set", "blocks=(0,)"]
    train(parse_args(["--out", str(tmp_path / "run"), "--epochs", "1", *args]), progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1: ")]
    assert [line.split(" steps")[0] for line in lines] == [f"epoch 1/1: {n}/10" for n in range(1, 11)]
    record = _log(tmp_path / "run")[0]
    printed = dict(item.rsplit(" ", 1) for item in lines[-1].split("steps/s, ")[1].split(", "))
    assert set(printed) == {"loss", "task", "ratio", "train_keep1"}
    for key, value in printed.items():
        assert float(value) == pytest.approx(record[key], rel=1e-3), key


def test_sait_sparse_steps_draw_their_density_from_a_range(tmp_path, monkeypatch):
    """``--set train_density=(low, high)``: every sparse (odd) step runs at a density drawn from the range,
    the draws differ, and the same seed draws the same ones (so runs and resumes repeat)."""
    from tokenopt.policies.sait import SaiT
    from tokenopt.train import parse_args, train

    drawn = []
    plain = SaiT.sparse_density
    monkeypatch.setattr(SaiT, "sparse_density", lambda self, u: drawn.append(plain(self, u)) or drawn[-1])
    args = ["--train-images", "256", "--test-images", "100", "--batch", "32", "--depth", "2", "--embed-dim", "32",
            "--policy", "sait", "--set", "train_density=(0.4,0.8)", "--no-progress", "--epochs", "1"]
    for run in ("a", "b"):
        train(parse_args(["--out", str(tmp_path / run), *args]), progress=False)
    assert len(drawn) == 2 * 4  # 256 images / batch 32 = 8 steps, 4 sparse, per run
    assert all(0.4 <= d <= 0.8 for d in drawn) and len(set(drawn[:4])) == 4
    assert drawn[:4] == drawn[4:]


def test_device_option(tmp_path):
    """``--device``: "auto" is CUDA only where there is one; asking for CUDA on a machine without one is a
    clear error before any work; the weights written load anywhere (CPU tensors)."""
    from tokenopt.train import _device, parse_args, train

    auto = parse_args(["--out", str(tmp_path / "a")])
    assert auto.device == "auto"
    assert _device(auto).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path / "a"), "--device", "meta"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device.*--device cpu"):
            train(parse_args(["--out", str(tmp_path / "c"), "--device", "cuda", *TINY]), progress=False)
        assert not os.path.exists(tmp_path / "c")
    cfg = parse_args(["--out", str(tmp_path / "cpu"), "--epochs", "1", "--device", "cpu", *TINY])
    train(cfg, progress=False)
    state = torch.load(tmp_path / "cpu" / "model.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in state.values())


def test_teacher_and_bf16_precision(tmp_path):
    """``--teacher`` picks the model distilled from (default: ``--init``, so naming it changes nothing);
    ``--teacher`` without ``--distill`` and an unknown ``--precision`` are errors; ``--precision bf16``
    trains under autocast: a different but close run."""
    from tokenopt.train import parse_args, train

    small = ["--train-images", "128", "--test-images", "64", "--batch", "64", "--depth", "2", "--embed-dim", "32",
             "--warmup-steps", "1", "--no-progress", "--epochs", "1"]
    for seed in ("0", "1"):
        train(parse_args(["--out", str(tmp_path / f"base{seed}"), "--seed", seed, *small]), progress=False)
    init = ["--init", str(tmp_path / "base0" / "model.pt"), "--distill", "--policy", "sait",
            "--set", "train_density=0.5"]

    def run(name, *extra):
        train(parse_args(["--out", str(tmp_path / name), *init, *extra, *small]), progress=False)
        return _log(tmp_path / name)[0], torch.load(tmp_path / name / "model.pt", weights_only=True)

    default, w_default = run("default")
    same, w_same = run("same", "--teacher", str(tmp_path / "base0" / "model.pt"))
    other, _ = run("other", "--teacher", str(tmp_path / "base1" / "model.pt"))
    assert same["loss"] == default["loss"] and all(torch.equal(w_same[k], w_default[k]) for k in w_default)
    assert other["distill"] > 2 * default["distill"]  # a different model's predictions are further away
    bf16, w_bf16 = run("bf16", "--precision", "bf16")
    assert bf16["loss"] != default["loss"] and abs(bf16["loss"] - default["loss"]) < 0.05 * default["loss"]
    assert all(w.dtype == torch.float32 for w in w_bf16.values())
    with pytest.raises(ValueError, match="add --distill"):
        train(parse_args(["--out", str(tmp_path / "x"), "--teacher", str(tmp_path / "base1" / "model.pt"),
                          *small]), progress=False)
    with pytest.raises(SystemExit):
        parse_args(["--precision", "fp16"])


def test_policy_lr_scale(tmp_path):
    """``--policy-lr-scale`` sets the learning rate of the policy's own modules (AdaViT's decision networks)
    and of nothing else: one AdamW step moves them about that many times further, the model's weights
    exactly as far as at scale 1. Not a number > 0 is an error. (Also: AdaViT's after-training step.)"""
    import tokenopt
    from tokenopt.train import TrainConfig, build_model, parse_args, train

    small = ["--train-images", "64", "--test-images", "32", "--batch", "64", "--depth", "3", "--embed-dim", "32",
             "--warmup-steps", "1", "--no-progress", "--epochs", "1"]
    train(parse_args(["--out", str(tmp_path / "base"), *small]), progress=False)
    init = torch.load(tmp_path / "base" / "model.pt", weights_only=True)

    def run(scale):
        out = tmp_path / f"s{scale}"
        train(parse_args(["--out", str(out), "--init", str(tmp_path / "base" / "model.pt"), "--policy", "adavit",
                          "--policy-lr-scale", str(scale), *small]), progress=False)
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        groups = ckpt["optimizer"]["param_groups"]
        after = _log(out)[-1]["after_training"]  # AdaViT's gates calibrated once training ended (policy.pt)
        assert len(after["report"]) == 2 * (4 + 2) + 2 and 0 <= after["test_accuracy"] <= 1
        assert "after_training" not in ckpt["log"][-1]  # the checkpoint keeps the trained state, to resume from
        return torch.load(out / "model.pt", weights_only=True), torch.load(out / "policy.pt", weights_only=True), groups

    model1, policy1, groups1 = run(1)
    model10, policy10, groups10 = run(10)
    assert [g["lr"] for g in groups10] == pytest.approx([g["lr"] * f for g, f in zip(groups1, (1, 10))])
    for k in init:  # the model's weights take the same step
        torch.testing.assert_close(model10[k], model1[k])
    fresh = tokenopt.prepare_training(build_model(TrainConfig(depth=3, embed_dim=32)), policy="adavit",
                                      example_inputs=(torch.zeros(2, 1, 28, 28),)).policy_state_dict()
    policy1, policy10 = (torch.load(tmp_path / f"s{s}" / "checkpoint.pt", weights_only=False)["model"] for s in (1, 10))
    step1 = torch.cat([(policy1[k] - fresh[k]).flatten() for k in fresh if "fc.bias" in k])
    step10 = torch.cat([(policy10[k] - fresh[k]).flatten() for k in fresh if "fc.bias" in k])
    assert step1.abs().max() > 0 and torch.allclose(step10, 10 * step1, rtol=0.05, atol=1e-7)
    with pytest.raises(ValueError, match="policy-lr-scale"):
        train(parse_args(["--out", str(tmp_path / "x"), "--policy-lr-scale", "0", *small]), progress=False)


def test_init_policy_continues_the_decision_networks(tmp_path):
    """``--init-policy`` starts a learned policy's own modules (DynamicViT's predictors) from a ``policy.pt`` or
    a ``checkpoint.pt``: with a vanishing learning rate the continued run keeps them, while a run without it
    starts fresh ones.
    A policy.pt of other blocks, or one given to a policy without weights of its own, is a clear error."""
    from tokenopt.train import parse_args, train

    small = ["--train-images", "128", "--test-images", "64", "--batch", "64", "--depth", "3", "--embed-dim", "32",
             "--warmup-steps", "1", "--no-progress", "--epochs", "1"]
    train(parse_args(["--out", str(tmp_path / "base"), *small]), progress=False)
    init = ["--init", str(tmp_path / "base" / "model.pt"), "--policy", "dynamicvit", "--set", "blocks=(0,)"]
    train(parse_args(["--out", str(tmp_path / "first"), *init, "--lr", "3e-3", *small]), progress=False)
    trained = torch.load(tmp_path / "first" / "policy.pt", weights_only=True)
    still = ["--lr", "1e-10", *small]
    given = ["--init-policy", str(tmp_path / "first" / "policy.pt")]
    train(parse_args(["--out", str(tmp_path / "cont"), *init, *given, *still]), progress=False)
    train(parse_args(["--out", str(tmp_path / "fresh"), *init, *still]), progress=False)
    cont = torch.load(tmp_path / "cont" / "policy.pt", weights_only=True)
    fresh = torch.load(tmp_path / "fresh" / "policy.pt", weights_only=True)
    assert set(cont) == set(trained)
    for k in trained:
        torch.testing.assert_close(cont[k], trained[k], atol=1e-6, rtol=0)
    assert max((fresh[k] - trained[k]).abs().max() for k in trained) > 1e-3
    # a checkpoint.pt gives the networks as trained (before any after-training step, e.g. AdaViT's calibration)
    ckpt = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)["model"]
    from_ckpt = ["--init-policy", str(tmp_path / "first" / "checkpoint.pt")]
    train(parse_args(["--out", str(tmp_path / "cont2"), *init, *from_ckpt, *still]), progress=False)
    cont2 = torch.load(tmp_path / "cont2" / "policy.pt", weights_only=True)
    assert set(cont2) == set(trained)
    for k in trained:
        torch.testing.assert_close(cont2[k], ckpt[k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="does not fit policy 'dynamicvit'.*same --policy, --set blocks"):
        train(parse_args(["--out", str(tmp_path / "x"), *init[:4], "--set", "blocks=(0,1)", *given, *still]),
              progress=False)
    with pytest.raises(ValueError, match="no weights of its own.*drop --init-policy"):
        train(parse_args(["--out", str(tmp_path / "y"), *init[:2], "--policy", "sait", *given, *still]),
              progress=False)
