import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import tokenopt
from tests.models import hf_vit, timm_model


def test_every_node_has_shape_and_dtype():
    gm = tokenopt.capture(timm_model("deit_tiny_patch16_224", depth=2))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr") or (node.op == "call_function" and "val" in node.meta):
            tm = node.meta.get("tensor_meta")
            if isinstance(node.meta.get("val"), torch.Tensor):
                assert tm is not None and tm.dtype == torch.float32 and len(tm.shape) >= 1, node.name


def test_hf_vit_is_captured_although_symbolic_trace_fails():
    model = hf_vit(layers=2)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    gm = tokenopt.capture(model)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out, ref = gm(x), model(x)
    assert type(out).__name__ == type(ref).__name__  # same output structure
    torch.testing.assert_close(out.logits, ref.logits)


def test_capture_restores_train_mode():
    model = timm_model("deit_tiny_patch16_224", depth=1).train()
    tokenopt.capture(model)
    assert model.training and all(m.training for m in model.modules())


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _DataDependent()

    def forward(self, x):
        return self.inner(x)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # branches on a tensor value: cannot be captured
            return x * 2
        return x


def test_untraceable_model_error_names_the_module():
    with pytest.raises(tokenopt.CaptureError, match=r"inner \(_DataDependent\)"):
        tokenopt.capture(_Branchy(), example_inputs=(torch.randn(2, 4),))


def test_missing_input_size_asks_for_example_inputs():
    with pytest.raises(tokenopt.CaptureError, match="pass example_inputs"):
        tokenopt.capture(nn.Linear(4, 4))


def test_import_tokenopt_loads_neither_triton_nor_cuda():
    code = (
        "import sys, torch, tokenopt\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'cuda initialised'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_default_example_follows_a_non_default_image_size_and_channel_count():
    import timm

    from tokenopt.capture import default_example_inputs

    model = timm.create_model("vit_tiny_patch16_224", depth=1, img_size=28, patch_size=2, in_chans=1, num_classes=3).eval()
    x = default_example_inputs(model)[0]
    assert tuple(x.shape[1:]) == (1, 28, 28)
    gm = tokenopt.optimize(model, policy="none")
    y = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(gm(y), model(y))
