"""The tokenopt custom ops: schemas and fake implementations (torch.library.opcheck), export through
them, lazy Triton import and the error off CUDA without the interpreter."""

import os
import subprocess
import sys

import pytest
import torch

from tokenopt.kernels import fused, reference as ref  # noqa: F401  (registers torch.ops.tokenopt.*)

tk = torch.ops.tokenopt


def _samples():
    gen = torch.Generator().manual_seed(0)
    b, n, h, d = 3, 13, 3, 64
    x = torch.randn(b, n, h * d, generator=gen)
    q, k, v = torch.randn(3, b, h, n, d, generator=gen).unbind(0)
    cu = torch.tensor([0, 5, 6, 13])
    pq, pk, pv = torch.randn(3, 1, h, 13, d, generator=gen).unbind(0)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 9:] = False
    return {
        "varlen_attention": (pq, pk, pv, cu, cu, 0.125),
        "gather_packed": (x, torch.tensor([0, 14, 27, 38])),
        "unpack_padded": (pq, cu),
        "gather_tokens": (x, torch.tensor([[0, 2], [0, 5], [0, 12]]), 1),
        "ats_select_dense": (q, k, v, 0.125, 1, 6, 2, valid),
        "ats_select_packed": (pq, pk, pv, cu, 0.125, 1, 6, 2),
        "topk_gather": (x, q, k, 0.125, 5, 1, True, None),
        "tome_merge": (x, k, None, 4, 1),
    }


SAMPLES = _samples()
# ops whose output size depends on values: their fake impl gives an unbacked size, which opcheck's
# fake-tensor test can only check with a shape env; schema and dispatch are still checked
DATA_DEPENDENT = {"unpack_padded", "ats_select_dense", "ats_select_packed"}


@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck(name):
    tests = ("test_schema", "test_autograd_registration")
    if name not in DATA_DEPENDENT:
        tests += ("test_faketensor",)
    torch.library.opcheck(getattr(tk, "triton_" + name), SAMPLES[name], test_utils=tests)


@pytest.mark.parametrize("name", sorted(DATA_DEPENDENT))
def test_data_dependent_fakes_trace_with_unbacked_sizes(name):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in SAMPLES[name]]
        out = getattr(tk, "triton_" + name)(*args)
    real = getattr(tk, "triton_" + name)(*SAMPLES[name])
    for o, r in zip(out, real):
        assert o.dtype == r.dtype and o.dim() == r.dim()
        assert o.shape[0] == r.shape[0]  # the batch is known, the kept/padded width is a symbol
        assert isinstance(o.shape[-1 if o.dim() == 2 else 1], torch.SymInt) or o.dim() == 4


def test_ops_are_visible_to_torch_export():
    class Merge(torch.nn.Module):
        def forward(self, x, k):
            return tk.triton_tome_merge(x, k, None, 4, 1)[0].sum(-1)

    x, k = SAMPLES["tome_merge"][:2]
    ep = torch.export.export(Merge(), (x, k))
    assert any(n.target is tk.triton_tome_merge.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, k), Merge()(x, k))


def test_import_is_lazy_and_cpu_without_interpreter_is_refused():
    code = (
        "import sys, torch\n"
        "import tokenopt, tokenopt.kernels.fused\n"
        "assert 'triton' not in sys.modules, 'importing the ops imported triton'\n"
        "x = torch.zeros(1, 4, 3)\n"
        "try:\n"
        "    torch.ops.tokenopt.triton_gather_packed(x, torch.tensor([1]))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "run on CUDA tensors, got cpu tensors" in out.stdout
    assert "kernels='reference'" in out.stdout
