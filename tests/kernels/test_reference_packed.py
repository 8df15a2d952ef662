"""Packed (ragged) token ops against per-image loops and the padded ops."""

import pytest
import torch

from tokenopt.kernels import reference as ref


def _random_selection(b, n, num_prefix, gen):
    keep = torch.rand(b, n - num_prefix, generator=gen) < 0.5
    keep[0] = False  # an image that keeps no patch token
    keep[-1] = True  # an image that keeps every token
    return ref._indices_of(keep, num_prefix)


@pytest.mark.parametrize("b, n, c, num_prefix", [(1, 197, 192, 1), (3, 17, 5, 2), (5, 257, 384, 5)])
def test_pack_then_unpack_equals_padded_gather(b, n, c, num_prefix):
    gen = torch.Generator().manual_seed(b * n)
    x = torch.randn(b, n, c, generator=gen)
    idx, valid = _random_selection(b, n, num_prefix, gen)
    flat, cu = ref.packed_index(idx, valid, None, x, token_dim=1)
    packed = ref.gather_packed(x, flat)
    assert packed.shape == (1, int(valid.sum()), c)
    assert cu.tolist() == [0] + valid.sum(1).cumsum(0).tolist()
    padded, pvalid = ref.unpack_padded(packed, cu)
    expected = ref.gather_tokens(x, idx, 1) * valid[..., None]
    torch.testing.assert_close(padded, expected)
    assert torch.equal(pvalid, valid)
    # token i of every image, and pooling over each image's own tokens
    torch.testing.assert_close(ref.packed_first(packed, cu, 0), ref.gather_tokens(x, idx, 1)[:, 0])
    torch.testing.assert_close(ref.packed_mean(packed, cu, num_prefix), ref.masked_mean(ref.gather_tokens(x, idx, 1), valid, num_prefix))


def test_packed_index_of_an_already_packed_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 11, 3, generator=gen)
    idx, valid = _random_selection(4, 11, 1, gen)
    flat, cu = ref.packed_index(idx, valid, None, x, token_dim=1)
    packed = ref.gather_packed(x, flat)
    # second selection, on the packed batch: keep the first two tokens of each image
    lengths = (cu[1:] - cu[:-1]).tolist()
    idx2 = torch.tensor([[0, 1] for _ in lengths])
    valid2 = torch.tensor([[n > 0, n > 1] for n in lengths])
    flat2, cu2 = ref.packed_index(idx2, valid2, cu, packed)
    twice = ref.gather_packed(packed, flat2)
    expected = torch.cat([x[i, idx[i, :2]][valid2[i]] for i in range(4)])
    torch.testing.assert_close(twice[0], expected)
    assert cu2.tolist() == [0] + valid2.sum(1).cumsum(0).tolist()


@pytest.mark.parametrize("heads, d", [(3, 64), (6, 32)])
def test_packed_cls_scores_equal_scoring_the_padded_tensors(heads, d):
    gen = torch.Generator().manual_seed(heads)
    lengths = [5, 1, 19, 0, 8]  # an image with only its CLS token, and an empty one
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v = (torch.randn(1, heads, sum(lengths), d, generator=gen) for _ in range(3))
    v[0, :, 5] = float("nan")  # image 1's only token is NaN: it stays in image 1
    scale = d ** -0.5
    cls, vnorm, valid = ref.packed_cls_scores(q, k, v, cu, scale)
    kp, pvalid = ref.unpack_padded(k, cu)
    vp, _ = ref.unpack_padded(v, cu)
    expected_cls = ref.cls_attention(ref.packed_first(q, cu), kp, scale, ref.valid_to_bias(pvalid, q.dtype))
    assert torch.equal(valid, pvalid)
    ok = torch.tensor([i != 1 and n > 0 for i, n in enumerate(lengths)])
    torch.testing.assert_close(cls[ok], expected_cls[ok])
    assert torch.isnan(vnorm[1, 0]) and not torch.isnan(vnorm[ok]).any()
    expected = ref.ats_scores(expected_cls, vp, 1, pvalid)
    torch.testing.assert_close(ref.ats_scores_from_norms(cls, vnorm, 1, valid)[ok], expected[ok])


@pytest.mark.parametrize("heads, d", [(3, 64), (6, 64), (2, 7)])
@pytest.mark.parametrize("dense_keys", [True, False])
@pytest.mark.parametrize("n", [19, ref._SHORT_KEYS + 41])  # both of varlen_attention's code paths
def test_varlen_attention_matches_per_image_sdpa(heads, d, dense_keys, n):
    gen = torch.Generator().manual_seed(heads * d)
    b = 4
    lengths_q = [5, 0, n, 1]
    lengths_k = [n] * b if dense_keys else [7, 3, n, 2]
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist())
    q = torch.randn(1, heads, sum(lengths_q), d, generator=gen)
    if dense_keys:
        k, v = torch.randn(b, heads, n, d, generator=gen), torch.randn(b, heads, n, d, generator=gen)
        cu_k = None
    else:
        k = torch.randn(1, heads, sum(lengths_k), d, generator=gen)
        v = torch.randn(1, heads, sum(lengths_k), d, generator=gen)
        cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist())
    out = ref.varlen_attention(q, k, v, cu_q, cu_k, 0.3)
    for i in range(b):
        qs = slice(int(cu_q[i]), int(cu_q[i + 1]))
        if dense_keys:
            ki, vi = k[i:i + 1], v[i:i + 1]
        else:
            ks = slice(int(cu_k[i]), int(cu_k[i + 1]))
            ki, vi = k[:, :, ks], v[:, :, ks]
        # reference: explicit softmax(q k^T * scale) v, image by image
        attn = torch.softmax(q[:, :, qs] @ ki.transpose(-2, -1) * 0.3, dim=-1)
        torch.testing.assert_close(out[:, :, qs], attn @ vi)


def test_ats_select_score_mass_in_one_token():
    scores = torch.zeros(2, 10)
    scores[0, 7] = 1.0
    scores[1] = 0.1
    idx, valid = ref.ats_select(scores, num_samples=5, min_tokens=0, num_prefix=1)
    assert idx[0][valid[0]].tolist() == [0, 8]  # CLS and the one token (index 7 + 1 prefix)
    assert valid[1].sum() == 6  # uniform scores: 5 distinct samples + CLS
    idx, valid = ref.ats_select(scores, num_samples=5, min_tokens=3, num_prefix=1)
    assert valid[0].sum() == 1 + 3  # the floor tops the image up with its best tokens


def test_ats_select_never_keeps_padding():
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    valid_in = torch.tensor([[True, True, True, False, False]])
    idx, valid = ref.ats_select(scores, num_samples=8, min_tokens=4, num_prefix=1, valid=valid_in)
    assert sorted(idx[0][valid[0]].tolist()) == [0, 1, 2]
