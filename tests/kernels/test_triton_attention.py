"""Triton varlen attention (``tokenopt.kernels.triton.attention``) against ``reference.varlen_attention``.

The reference is itself checked against an explicit per-image softmax in
``tests/kernels/test_reference_packed.py``. Tolerances follow PyTorch's own drift: the "truth" is the
reference on the inputs upcast one precision (fp32 -> fp64, fp16 -> fp32); the kernel's largest
error against it may be at most ``_SLACK`` times the largest error of the reference run at the input
dtype, plus a tiny ``atol``. Runs under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``).
"""

import pytest
import torch

pytest.importorskip("triton")

from tokenopt.kernels import reference as ref  # noqa: E402
from tokenopt.kernels.triton import attention as ta  # noqa: E402

DTYPES = [torch.float32, torch.float16]
_UPCAST = {torch.float32: torch.float64, torch.float16: torch.float32}
_ATOL = {torch.float32: 1e-6, torch.float16: 1e-4}
_SLACK = 2.0


def _offsets(lengths):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.long)


def _inputs(lengths_q, lengths_k, n_dense, h, d, dtype, gen, fused):
    """Packed q and packed (``lengths_k``) or dense (``n_dense``) k/v.

    ``fused``: q/k/v are views of ``[1, T, 3, H, D]`` (packed) / ``[B, N, 3, H, D]`` (dense keys)
    projections permuted to ``[., H, ., D]``, the layout a ViT's qkv linear gives.
    """
    tq = sum(lengths_q)
    b = len(lengths_q)
    if fused:
        qkv = torch.randn(1, tq, 3, h, d, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
        q = qkv[0]
        if lengths_k is None:
            kv = torch.randn(b, n_dense, 3, h, d, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
            k, v = kv[1], kv[2]
        elif list(lengths_k) == list(lengths_q):
            k, v = qkv[1], qkv[2]  # self-attention of packed tokens: one fused projection
        else:
            kv = torch.randn(1, sum(lengths_k), 3, h, d, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
            k, v = kv[1], kv[2]
    else:
        q = torch.randn(1, h, tq, d, generator=gen).to(dtype)
        nk = (1, h, sum(lengths_k), d) if lengths_k is not None else (b, h, n_dense, d)
        k, v = torch.randn(nk, generator=gen).to(dtype), torch.randn(nk, generator=gen).to(dtype)
    cu_k = _offsets(lengths_k) if lengths_k is not None else None
    return q, k, v, _offsets(lengths_q), cu_k


def _check_against_reference(q, k, v, cu_q, cu_k, scale):
    """Kernel vs reference: same shape, dtype and layout; error within PyTorch's own drift."""
    out = ta.varlen_attention(q, k, v, cu_q, cu_k, scale)
    expected = ref.varlen_attention(q, k, v, cu_q, cu_k, scale)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.stride() == expected.stride()  # [1, Tq, H, D] memory seen as [1, H, Tq, D]
    up = _UPCAST[q.dtype]
    truth = ref.varlen_attention(q.to(up), k.to(up), v.to(up), cu_q, cu_k, scale)
    rows = slice(0, int(cu_q[-1]))  # every query row belongs to an image in these tests
    out_err = (out[:, :, rows].to(up) - truth[:, :, rows]).abs().max().item() if out.numel() else 0.0
    ref_err = (expected[:, :, rows].to(up) - truth[:, :, rows]).abs().max().item() if out.numel() else 0.0
    assert out_err <= _SLACK * ref_err + _ATOL[q.dtype], (out_err, ref_err)
    assert torch.isfinite(out[:, :, rows]).all()
    return out


# (heads, head dim, query lengths, packed key lengths, dense key count): batches of 1, 3 and 5
# images with 197 / 257 / odd lengths, an image with no queries and one with a single query
CASES = [
    pytest.param(3, 64, [197, 0, 37], [197, 5, 37], 197, id="h3-d64-b3"),
    pytest.param(6, 64, [257], [257], 257, id="h6-d64-b1"),
    pytest.param(6, 64, [1, 13, 0, 197, 37], [1, 13, 0, 197, 40], 37, id="h6-d64-b5"),
    pytest.param(3, 40, [13, 257, 1], [20, 257, 1], 257, id="h3-d40-b3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys", ["dense", "packed"])
@pytest.mark.parametrize("h, d, lengths_q, lengths_k, n_dense", CASES)
def test_matches_reference(h, d, lengths_q, lengths_k, n_dense, keys, dtype):
    gen = torch.Generator().manual_seed(h * d + sum(lengths_q))
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k if keys == "packed" else None, n_dense, h, d, dtype, gen, False)
    _check_against_reference(q, k, v, cu_q, cu_k, d ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keys", ["dense", "packed-self", "packed-cross"])
def test_fused_qkv_views(keys, dtype):
    gen = torch.Generator().manual_seed(len(keys))
    lengths_q = [197, 1, 0, 37]
    lengths_k = {"dense": None, "packed-self": lengths_q, "packed-cross": [197, 3, 0, 41]}[keys]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, 197, 3, 64, dtype, gen, True)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = _check_against_reference(q, k, v, cu_q, cu_k, 0.125)
    # the strides were honoured: contiguous copies of the views give the same bits
    again = ta.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, 0.125)
    assert torch.equal(out, again)


def test_one_query_attends_only_to_its_own_keys():
    """A single key per image: each output row is exactly that image's value row (softmax of one logit)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k = _inputs([1, 2, 1], [1, 1, 1], None, 3, 40, torch.float32, gen, False)
    out = ta.varlen_attention(q, k, v, cu_q, cu_k, 10.0)
    expected = v[0][:, [0, 1, 1, 2]]
    assert torch.equal(out[0], expected)


def test_image_with_queries_but_no_keys_gives_zeros():
    """Cannot come out of a token policy (CLS is always kept); the kernel writes 0 like the reference on CPU."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, cu_q, cu_k = _inputs([5, 3, 13], [7, 0, 13], None, 3, 64, torch.float32, gen, False)
    out = _check_against_reference(q, k, v, cu_q, cu_k, 0.125)
    assert torch.equal(out[0, :, 5:8], torch.zeros(3, 3, 64))


@pytest.mark.parametrize("keys", ["dense", "packed"])
def test_empty_batch(keys):
    q = torch.randn(1, 6, 0, 64)
    cu_q = torch.zeros(1, dtype=torch.long)
    if keys == "dense":
        k = v = torch.randn(0, 6, 197, 64)
        cu_k = None
    else:
        k = v = torch.randn(1, 6, 0, 64)
        cu_k = torch.zeros(1, dtype=torch.long)
    out = ta.varlen_attention(q, k, v, cu_q, cu_k, 0.125)
    expected = ref.varlen_attention(q, k, v, cu_q, cu_k, 0.125)
    assert out.shape == expected.shape == (1, 6, 0, 64) and out.stride() == expected.stride()


def test_images_without_queries_leave_no_trace():
    """All images empty but the last: the grid is sized by the one non-empty image, rows land in place."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, cu_q, cu_k = _inputs([0, 0, 13], None, 13, 6, 64, torch.float32, gen, False)
    out = _check_against_reference(q, k, v, cu_q, cu_k, 0.125)
    assert out.shape == (1, 6, 13, 64)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 3, 10, 64)
    kv = torch.randn(1, 3, 10, 64)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="dense k/v"):
        ta.varlen_attention(q, kv, kv, cu, None, 0.1)  # dense keys need B = 2 rows
    with pytest.raises(TypeError, match="cu_q must be int64"):
        ta.varlen_attention(q, kv, kv, cu.float(), cu, 0.1)
    with pytest.raises(ValueError, match="cu_k must have"):
        ta.varlen_attention(q, kv, kv, cu, torch.tensor([0, 10]), 0.1)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.randn(1, 3, 10, 160)
        ta.varlen_attention(big, big, big, cu, cu, 0.1)
    with pytest.raises(TypeError, match="one dtype"):
        ta.varlen_attention(q, kv.half(), kv, cu, cu, 0.1)
    with pytest.raises(ValueError, match="cu_q must be non-decreasing"):
        ta.varlen_attention(q, kv, kv, torch.tensor([0, 6, 4]), cu, 0.1)
    with pytest.raises(ValueError, match="within"):
        ta.varlen_attention(q, kv, kv, torch.tensor([0, 4, 12]), torch.tensor([0, 4, 12]), 0.1)
