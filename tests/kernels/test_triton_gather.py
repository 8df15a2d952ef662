"""Triton row gathers (``tokenopt.kernels.triton.gather``) against ``reference``: equal bits.

Gathers only load and store, so every comparison is on the raw bits (NaN payloads included), not
within a tolerance. Runs under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``) on CPU tensors.
"""

import pytest
import torch

pytest.importorskip("triton")

from tokenopt.kernels import reference as ref  # noqa: E402
from tokenopt.kernels.triton import gather as tg  # noqa: E402

DTYPES = [torch.float32, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16}


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes, dtypes and bit patterns (NaN == NaN when the payloads match)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    view = _INT_VIEW[actual.dtype]
    a, e = actual.contiguous().view(view), expected.contiguous().view(view)
    bad = (a != e).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}"


def _selection(b, n, num_prefix, gen):
    """Random ATS-like kept tokens: (idx, valid) [B, M], with an image that keeps no patch token."""
    keep = torch.rand(b, n - num_prefix, generator=gen) < 0.4
    keep[0] = False
    if b > 1:
        keep[-1] = True
    return ref._indices_of(keep, num_prefix)


def _tokens(b, n, c, dtype, gen, strided):
    """``[B, N, C]``; ``strided`` gives a non-contiguous view (every other channel of a wider tensor)."""
    if strided:
        return torch.randn(b, n, 2 * c, generator=gen).to(dtype)[:, :, ::2]
    return torch.randn(b, n, c, generator=gen).to(dtype)


def _qkv_k(b, n, h, d, dtype, gen):
    """Keys as the model sees them: a ``[B, H, N, D]`` view of a fused ``[B, N, 3, H, D]`` projection."""
    qkv = torch.randn(b, n, 3, h, d, generator=gen).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4)[1]


SIZES_3D = [(1, 197, 192), (3, 257, 384), (3, 13, 192)]
SIZES_4D = [(1, 197, 3, 64), (3, 257, 6, 64), (3, 37, 3, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, c", SIZES_3D)
@pytest.mark.parametrize("strided", [False, True])
def test_gather_packed_3d_dense_then_packed(b, n, c, dtype, strided):
    gen = torch.Generator().manual_seed(b * n + c)
    x = _tokens(b, n, c, dtype, gen, strided)
    idx, valid = _selection(b, n, 1, gen)
    flat, cu = ref.packed_index(idx, valid, None, x, token_dim=1)
    packed = tg.gather_packed(x, flat)
    assert packed.is_contiguous()
    assert_same_bits(packed, ref.gather_packed(x, flat))
    # a second selection on the packed [1, T, C] buffer: the first two tokens of every image
    lengths = (cu[1:] - cu[:-1]).tolist()
    idx2 = torch.tensor([[0, 1]] * b)
    valid2 = torch.tensor([[m > 0, m > 1] for m in lengths])
    flat2, _ = ref.packed_index(idx2, valid2, cu, packed)
    assert_same_bits(tg.gather_packed(packed, flat2), ref.gather_packed(packed, flat2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, h, d", SIZES_4D)
def test_gather_packed_4d_dense_then_packed(b, n, h, d, dtype):
    gen = torch.Generator().manual_seed(b * n + h)
    k = _qkv_k(b, n, h, d, dtype, gen)
    assert not k.is_contiguous()
    idx, valid = _selection(b, n, 1, gen)
    flat, cu = ref.packed_index(idx, valid, None, k, token_dim=2)
    packed = tg.gather_packed(k, flat)
    assert_same_bits(packed, ref.gather_packed(k, flat))
    # packed [1, H, T, D] input, as a non-contiguous view, again with a selection
    view = packed.transpose(1, 2).contiguous().transpose(1, 2)
    keep = torch.rand(int(cu[-1]), generator=gen) < 0.5
    flat2 = keep.nonzero()[:, 0]
    assert_same_bits(tg.gather_packed(view, flat2), ref.gather_packed(view, flat2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [None, 3, 6])
def test_unpack_padded_keeps_nan_out_of_padding(dtype, heads):
    gen = torch.Generator().manual_seed(7 if heads is None else heads)
    lengths = [197, 0, 1, 13, 257, 37]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    t = sum(lengths)
    if heads is None:
        x = torch.randn(1, t, 2 * 192, generator=gen).to(dtype)[:, :, ::2]  # [1, T, 192], strided
        rows = x[0]
    else:
        x = torch.randn(1, t, heads, 64, generator=gen).to(dtype).transpose(1, 2)  # [1, H, T, 64] view
        rows = x[0].transpose(0, 1)
    # whole images of NaN (the one-token image, and the last image) next to images that get padding
    rows[cu[2]:cu[3]] = float("nan")
    rows[cu[5]:cu[6]] = float("nan")
    rows[cu[4] - 1] = float("inf")
    padded, valid = tg.unpack_padded(x, cu)
    exp_padded, exp_valid = ref.unpack_padded(x, cu)
    assert torch.equal(valid, exp_valid) and valid.dtype == torch.bool
    assert_same_bits(padded, exp_padded)
    # padding is exactly +0.0 (checked on the bits, not just == 0), and NaN stays in its own image
    pad = ~valid[:, None, :, None] if heads is not None else ~valid[..., None]
    pad_values = torch.where(pad, padded, 1.0)
    assert torch.equal(pad_values == 0, pad.expand_as(padded))
    assert not torch.signbit(pad_values).any()
    nan_images = torch.isnan(padded).flatten(1).any(1)
    assert nan_images.tolist() == [False, False, True, False, False, True]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, c", SIZES_3D)
def test_gather_tokens_dim1(b, n, c, dtype):
    gen = torch.Generator().manual_seed(n + c)
    x = _tokens(b, n, c, dtype, gen, strided=True)
    idx, _ = _selection(b, n, 2, gen)  # padded selection: repeated index 0 in padding slots
    out = tg.gather_tokens(x, idx, 1)
    assert out.is_contiguous()
    assert_same_bits(out, ref.gather_tokens(x, idx, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, h, d", SIZES_4D)
def test_gather_tokens_dim2(b, n, h, d, dtype):
    gen = torch.Generator().manual_seed(n + h)
    k = _qkv_k(b, n, h, d, dtype, gen)
    idx = torch.sort(torch.randint(0, n, (b, n // 2 + 1), generator=gen), dim=1).values  # with repeats
    assert_same_bits(tg.gather_tokens(k, idx, 2), ref.gather_tokens(k, idx, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    x3 = torch.randn(0, 197, 192).to(dtype)
    x4 = torch.randn(0, 3, 197, 64).to(dtype)
    empty = torch.zeros(0, dtype=torch.long)
    assert_same_bits(tg.gather_packed(x3, empty), ref.gather_packed(x3, empty))
    assert_same_bits(tg.gather_packed(x4, empty), ref.gather_packed(x4, empty))
    idx = torch.zeros(0, 5, dtype=torch.long)
    assert_same_bits(tg.gather_tokens(x3, idx, 1), ref.gather_tokens(x3, idx, 1))
    assert_same_bits(tg.gather_tokens(x4, idx, 2), ref.gather_tokens(x4, idx, 2))
    cu = torch.zeros(1, dtype=torch.long)
    for x in (torch.randn(1, 0, 192).to(dtype), torch.randn(1, 3, 0, 64).to(dtype)):
        padded, valid = tg.unpack_padded(x, cu)
        exp_padded, exp_valid = ref.unpack_padded(x, cu)
        assert padded.shape == exp_padded.shape and torch.equal(valid, exp_valid)
    # images that all kept nothing: a batch of 2 with no rows at all
    padded, valid = tg.unpack_padded(torch.randn(1, 0, 8), torch.zeros(3, dtype=torch.long))
    assert padded.shape == (2, 0, 8) and valid.shape == (2, 0)


def test_out_of_range_rows_are_zero_not_a_fault():
    x = torch.randn(2, 5, 4)
    out = tg.gather_packed(x, torch.tensor([9, 10, -1, 3]))
    assert torch.equal(out[0, 1:3], torch.zeros(2, 4))
    assert torch.equal(out[0, 0], x[1, 4]) and torch.equal(out[0, 3], x[0, 3])


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="dim=1"):
        tg.gather_tokens(x, torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="int64"):
        tg.gather_packed(x, torch.zeros(3))
    with pytest.raises(ValueError, match="packed"):
        tg.unpack_padded(x, torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="batch size"):
        tg.gather_tokens(x, torch.zeros(3, 2, dtype=torch.long), 1)
