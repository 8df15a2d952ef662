import json
import os

import pytest
import timm
import torch

import tokenopt
from tokenopt.viz import plot_tokens, token_sources
from tests.models import timm_model


@pytest.fixture(scope="module")
def model():
    return timm_model("deit_tiny_patch16_224", depth=6)


@pytest.mark.parametrize("policy, options", [("ats", dict(max_tokens=60, blocks=(2, 4))),
                                             ("topk", dict(keep_rate=0.5, blocks=(1, 3))),
                                             ("tome", dict(r=30))])
def test_token_sources_agree_with_token_counts(model, policy, options):
    gm = tokenopt.optimize(model, policy=policy, **options)
    x = torch.randn(1, 3, 224, 224)
    sources = token_sources(gm, x)
    counts = tokenopt.token_counts(gm, x)
    for block, where in sources.items():
        alive = where[where >= 0]
        # every surviving patch token is accounted for, and no two blocks of patches collide wrongly
        assert len(set(alive.tolist())) == int(counts[block][0]) - 1, block
        assert alive.min() >= 1  # token 0 is the CLS token, never a patch
    if policy == "tome":
        assert all((w >= 0).all() for w in sources.values())  # merging never drops a patch


def test_plot_tokens_writes_a_png(model, tmp_path):
    gm = tokenopt.optimize(model, policy="tome", r=30)
    display = torch.rand(224, 224, 3)
    path = plot_tokens(gm, display.permute(2, 0, 1)[None], display, str(tmp_path / "t.png"), title="t")
    assert os.path.getsize(path) > 10_000


def tokenopt_probe_grid():
    from tokenopt.fidelity import LinearProbe

    return LinearProbe.L2_GRID


def test_cli_bench_on_a_tiny_sample(tmp_path):
    pytest.importorskip("skimage")
    from tokenopt.cli import main
    from tokenopt.fidelity import FASHION_MNIST_ROOT

    if not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")):
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    out = tmp_path / "bench"

    calib = tmp_path / "calib_a.json"  # a calibrated config runs as a variant of its own
    tokenopt.calibrate(timm.create_model("test_vit"), "pitome", torch.randn(4, 3, 160, 160), flops=0.8,
                       shapes=("decreasing",), steps=2, progress=False).save(str(calib))
    assert main(["bench", "--model", "test_vit", "--train", "32", "--test", "16", "--batch", "8",
                 "--rounds", "1", "--threads", "1", "--policies", "topk", "tome", "--budget", "tome:r=4", "tome:r=6",
                 "--configs", str(calib), "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    names = [r["variant"] for r in data["rows"]]
    # calibrated configs first (the tuned operating points), then the policies; topk at its default budget
    assert names == ["eager", "pitome calibrated:calib_a", "topk keep_rate=0.78", "tome r=4", "tome r=6"]
    assert data["probe_l2"] in tokenopt_probe_grid()
    saved = torch.load(out / "features.pt")
    assert set(saved["test"]) == set(names) and saved["test"]["eager"].shape[0] == 16
    eager = data["rows"][0]
    assert eager["throughput_ratio"] == 1.0 and eager["cosine"] == pytest.approx(1.0)
    assert all(r["flops_ratio"] < 1.0 for r in data["rows"][1:])
    assert (out / "tradeoff.png").stat().st_size > 10_000


def test_cli_demo_leads_with_the_shipped_calibration_on_dinov2(tmp_path, monkeypatch):
    """``tokenopt demo`` (``scripts/dev demo``) is ``bench`` with the calibrated PiToMe shipped for DINOv2 first,
    ToMe at two budgets next, the CLS-attention policies after."""
    from tokenopt import cli

    seen = {}
    monkeypatch.setattr(cli, "_cmd_bench", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    args = seen["args"]
    assert args.model == "dinov2" and args.configs is None and args.policies == ["tome", "ats", "topk"]
    assert args.budget == ["tome:r=14", "tome:r=20"]
    shipped = cli.shipped_calibrations("dinov2")
    assert [os.path.basename(p) for p in shipped] == ["dinov2_pitome_flops049.json"]
    config = tokenopt.policies.make_config(shipped[0])
    assert isinstance(config, tokenopt.PiToMe) and config.r == (30, 27, 25, 22, 20, 17, 15, 12, 10, 7, 5, 2)
    assert cli.shipped_calibrations("test_vit") == []


def test_frontier_keeps_what_nothing_beats_on_both_axes():
    from tokenopt.cli import frontier

    rows = [dict(v="eager", throughput_ratio=1.0, drop=0.0), dict(v="a", throughput_ratio=1.5, drop=0.1),
            dict(v="b", throughput_ratio=1.4, drop=0.5), dict(v="c", throughput_ratio=2.0, drop=0.8),
            dict(v="d", throughput_ratio=1.9, drop=2.0)]
    assert [r["v"] for r in frontier(rows, "drop", lower_is_better=True)] == ["eager", "a", "c"]
    rows = [dict(v="x", throughput_ratio=1.0, cos=1.0), dict(v="y", throughput_ratio=2.0, cos=0.99),
            dict(v="z", throughput_ratio=1.5, cos=0.98)]
    assert [r["v"] for r in frontier(rows, "cos", lower_is_better=False)] == ["x", "y"]


def test_cli_viz_and_explain(tmp_path, capsys):
    pytest.importorskip("skimage")
    from tokenopt.cli import main

    png = tmp_path / "v.png"
    assert main(["viz", "--model", "deit_tiny_patch16_224", "--policy", "topk", "--out", str(png)]) == 0
    assert png.stat().st_size > 10_000
    assert main(["explain", "deit_tiny_patch16_224", "--policy", "topk", "--set", "keep_rate=0.5"]) == 0
    assert "realize_tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "0"], "must be at least 1"),
    (["bench", "--rounds", "0"], "must be at least 1"),
    (["bench", "--policies", "tome", "--budget", "ats:max_tokens=0.5"], "not among --policies"),
    (["bench", "--out", "/proc/tokenopt-cannot-write"], "not writable"),
    (["bench", "--configs", "/nonexistent/calib.json"], "no such file"),
])
def test_bench_arguments_are_checked_before_any_work(argv, message, capsys):
    from tokenopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in str(exc.value) + capsys.readouterr().err


def test_cli_optimize_out_writes_a_loadable_model(tmp_path, capsys):
    import torch

    from tokenopt.cli import main

    out = tmp_path / "m.pt2"
    assert main(["optimize", "deit_tiny_patch16_224", "--policy", "tome", "--out", str(out)]) == 0
    gm = tokenopt.load(out)
    assert gm(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    assert "tokenopt.load" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not writable"):
        main(["optimize", "deit_tiny_patch16_224", "--out", "/proc/nope/m.pt2"])
