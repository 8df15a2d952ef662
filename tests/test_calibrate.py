"""tokenopt.calibrate: per-block ToMe budgets found on a sample for a FLOPs target."""

import json

import pytest
import timm
import torch

import tokenopt
from tokenopt.calibrate import _budget
from tokenopt.flops import count_flops


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64, patch_size=8, num_classes=5).eval()


def test_calibration_meets_its_flops_target_with_the_most_faithful_schedule(vit, tmp_path):
    sample = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    result = tokenopt.calibrate(vit, "tome", sample, flops=0.75, shapes=("constant", "decreasing"), steps=3,
                                progress=False)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())  # the model untouched
    # the config it returns, built by optimize, meets the target on the sample
    gm = tokenopt.optimize(vit, policy=result.config, example_inputs=(sample[:2],))
    measured = count_flops(gm, sample[:2]) / count_flops(vit, sample[:2])
    assert measured == pytest.approx(result.flops_ratio) and measured <= 0.75
    assert len(result.config.r) == 4 and sum(result.config.r) > 0
    # it is the most faithful of the candidates that meet the target, and its fidelity is what it says
    meeting = [c for c in result.candidates if c["flops_ratio"] <= 0.75]
    assert result.fidelity == max(c["fidelity"] for c in meeting)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(gm(sample).double(), vit(sample).double(), dim=1).mean()
    assert float(cos) == pytest.approx(result.fidelity, abs=1e-6)
    assert {c["shape"] for c in result.candidates} == {"constant", "decreasing"}
    # saved as JSON that optimize accepts
    path = tmp_path / "calib.json"
    result.save(str(path))
    assert json.loads(path.read_text())["policy"] == "tome"
    again = tokenopt.optimize(vit, policy=str(path), example_inputs=(sample[:2],))
    assert again.meta["tokenopt.policy"] == result.config
    with torch.no_grad():
        torch.testing.assert_close(again(sample), gm(sample))


def test_schedule_shapes():
    assert _budget("tome", "constant", 4, 3) == (4, 4, 4)
    assert _budget("tome", "decreasing", 4, 3) == (6, 4, 2)
    assert _budget("tome", "increasing", 4, 3) == (2, 4, 6)


def test_calibration_errors_say_what_to_pass(vit):
    x = torch.randn(4, 3, 64, 64)
    with pytest.raises(ValueError, match="give one target"):
        tokenopt.calibrate(vit, "tome", x, progress=False)
    with pytest.raises(ValueError, match=r"flops must be a ratio in \(0, 1\)"):
        tokenopt.calibrate(vit, "tome", x, flops=1.5, progress=False)
    with pytest.raises(ValueError, match="at least 2 of your images"):
        tokenopt.calibrate(vit, "tome", x[:1], flops=0.5, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        tokenopt.calibrate(vit, "tome", torch.full_like(x, float("nan")), flops=0.5, progress=False)
    with pytest.raises(ValueError, match=r"policy in \(.tome., .pitome.\)"):
        tokenopt.calibrate(vit, "ats", x, flops=0.5, progress=False)
    with pytest.raises(ValueError, match="no tome schedule meets the target"):
        tokenopt.calibrate(vit, "tome", x, flops=0.05, shapes=("constant",), progress=False)


def test_cli_calibrate_asks_for_one_target(tmp_path):
    from tokenopt.cli import main

    with pytest.raises(SystemExit, match="give one target"):
        main(["calibrate", "--model", "deit_tiny_patch16_224", "--out", str(tmp_path / "c.json")])
