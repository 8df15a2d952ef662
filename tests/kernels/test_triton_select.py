"""Fused ATS / top-k selection (Triton, run by the CPU interpreter) against the reference chains.

* ``ats_select_dense`` = ``cls_attention`` (bias from ``valid``) -> ``ats_scores`` -> ``ats_select``;
  ``ats_select_packed`` = ``packed_cls_scores`` -> ``ats_scores_from_norms`` -> ``ats_select``;
  ``topk_gather`` = ``cls_attention`` -> ``topk_select`` -> ``gather_tokens`` (-> ``evit_fuse``, cat).
* Discrete outputs (indices, validity, gathered rows) must equal the reference's exactly on fp32
  random inputs. The kernels round where the reference rounds, so on fp16 inputs they differ from the
  reference only where a rounding of an intermediate (a logit, an attention weight) lands on the other
  side of an fp16 rounding boundary: about 1 image in 200 then changes its selection, always at a
  near-tie. An fp16 mismatch is accepted only on such a near-tie: ATS, a sampling point within 1e-4
  of a reference CDF step or two sorted scores within 1e-3 (relative), with at most 4 tokens changed
  and at most one such image per case; top-k, only tokens whose reference score is within 2e-3
  (relative) of the k-th largest may be swapped.
* Ties are tested where the reference's unstable sort leaves the order open (uniform scores,
  zero-score valid tokens next to padding): the kernels follow their documented order (equal scores
  by index, padding below every valid token), and the counts that do not depend on order must equal
  the reference's.
* EViT's fused token is held to the error PyTorch itself makes at the input dtype: the "truth" is the
  same formula in fp64 with the reference's indices; the kernel's error against it may be at most
  twice the reference's own error at the input dtype, plus a tiny atol.
"""

import pytest
import torch

from tokenopt.kernels import reference as ref

pytest.importorskip("triton")
from tokenopt.kernels.triton import select as sel  # noqa: E402

D = 64
SCALE = D ** -0.5
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5}


# --- inputs and references -----------------------------------------------------------------------


def _qkv(b, h, n, dtype, seed, views=True):
    """q, k, v ``[B, H, N, D]``; with ``views``, permuted views of one fused ``[B, N, 3, H, D]`` tensor."""
    gen = torch.Generator().manual_seed(seed)
    if views:
        qkv = torch.randn(b, n, 3, h, D, generator=gen).to(dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(b, h, n, D, generator=gen).to(dtype) for _ in range(3))


def _padding(b, n, seed):
    """Trailing padding of a padded batch: lengths n, about n/2, 3, ... (CLS always valid)."""
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = [n, max(2, n // 2), 3][:b] + torch.randint(2, n + 1, (max(b - 3, 0),), generator=gen).tolist()
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _dense_ref(q, k, v, num_prefix, num_samples, min_tokens, valid):
    bias = None if valid is None else ref.valid_to_bias(valid, q.dtype)
    s = ref.ats_scores(ref.cls_attention(q, k, SCALE, bias), v, num_prefix, valid)
    return ref.ats_select(s, num_samples, min_tokens, num_prefix, valid), s


def _packed_ref(q, k, v, cu, num_prefix, num_samples, min_tokens):
    cls, vnorm, valid = ref.packed_cls_scores(q, k, v, cu, SCALE)
    s = ref.ats_scores_from_norms(cls, vnorm, num_prefix, valid)
    return ref.ats_select(s, num_samples, min_tokens, num_prefix, valid), s


def _pack(q, k, v, lengths):
    """The first ``lengths[i]`` tokens of each image, packed ``[1, H, T, D]`` (views of one fused
    ``[1, T, 3, H, D]`` buffer), and the offsets."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    rows = [torch.stack([t[i, :, :n] for t in (q, k, v)]) for i, n in enumerate(lengths)]  # [3, H, n, D]
    fused = torch.cat(rows, dim=2).permute(2, 0, 1, 3).unsqueeze(0).contiguous()  # [1, T, 3, H, D]
    qp, kp, vp = fused.permute(2, 0, 3, 1, 4).unbind(0)
    return qp, kp, vp, cu


# --- checks --------------------------------------------------------------------------------------


def _assert_structure(idx, valid, num_prefix):
    """The layout of ``_indices_of``: prefix first (valid), then kept patch tokens ascending (valid),
    then padding (index 0, not valid)."""
    b, w = idx.shape
    assert idx.dtype == torch.int64 and valid.dtype == torch.bool and valid.shape == idx.shape
    assert torch.equal(idx[:, :num_prefix], torch.arange(num_prefix).expand(b, num_prefix))
    assert valid[:, :num_prefix].all()
    patch_idx, patch_valid = idx[:, num_prefix:], valid[:, num_prefix:]
    count = patch_valid.sum(1)
    assert torch.equal(patch_valid, torch.arange(w - num_prefix)[None, :] < count[:, None])
    assert (patch_idx[~patch_valid] == 0).all()
    assert (patch_idx[patch_valid] >= num_prefix).all()
    step = patch_idx.diff(dim=1)
    assert (step[patch_valid[:, 1:]] > 0).all()
    if b > 0 and w > num_prefix:
        assert int(count.max()) == w - num_prefix  # padded to the batch's largest count


def _near_tie(s, num_samples, d_cdf=1e-4, d_score=1e-3):
    """Per image: does the reference's sampling sit on a near-tie (see module docstring)?"""
    b, n = s.shape
    if n == 0 or num_samples == 0:
        return torch.zeros(b, dtype=torch.bool)
    ss = torch.sort(s, dim=1).values.double()
    cdf = ss.cumsum(1)
    points = (torch.arange(num_samples, dtype=torch.float64) + 0.5) / num_samples
    near_point = (cdf[:, :, None] - points).abs().amin(dim=(1, 2)) < d_cdf
    gap = (ss[:, 1:] - ss[:, :-1]) / ss[:, 1:].clamp_min(1e-30)
    near_swap = ((gap < d_score) & (ss[:, 1:] > 0)).any(1) if n > 1 else torch.zeros(b, dtype=torch.bool)
    return near_point | near_swap


def _assert_ats_equal(got, want, s_ref, n_tok, num_samples, dtype, token_valid=None, num_prefix=1):
    idx, valid = got
    idx_ref, valid_ref = want
    if dtype == torch.float32:
        assert torch.equal(idx, idx_ref), (idx, idx_ref)
        assert torch.equal(valid, valid_ref)
        return
    # fp16: exact except on near-ties (module docstring)
    kept = ref.scatter_keep(idx, valid, n_tok)
    kept_ref = ref.scatter_keep(idx_ref, valid_ref, n_tok)
    differs = (kept != kept_ref).any(1)
    if token_valid is not None:  # (prefix entries are valid even for an empty image, as in the reference)
        assert not (kept & ~token_valid)[:, num_prefix:].any(), "an invalid token was kept"
    assert int(differs.sum()) <= 1, f"{int(differs.sum())} images differ from the reference"
    assert (_near_tie(s_ref, num_samples)[differs]).all(), "a selection differs away from any near-tie"
    assert ((kept != kept_ref).sum(1) <= 4).all()
    if not differs.any():
        assert torch.equal(idx, idx_ref) and torch.equal(valid, valid_ref)


# --- ATS, dense ----------------------------------------------------------------------------------

DENSE_CASES = [
    # b, h, n, dtype, padded, num_prefix, num_samples, min_tokens
    (1, 3, 197, torch.float32, False, 1, 98, 8),
    (3, 6, 257, torch.float32, True, 1, 128, 16),
    (3, 3, 13, torch.float32, True, 1, 6, 4),
    (3, 3, 13, torch.float32, False, 1, 20, 0),  # more samples than patch tokens
    (3, 6, 37, torch.float32, True, 2, 3, 50),  # floor above the token count: capped by the valid ones
    (3, 6, 197, torch.float16, True, 1, 98, 8),
    (1, 3, 257, torch.float16, False, 1, 64, 8),
    (3, 6, 37, torch.float16, False, 1, 18, 4),
]


@pytest.mark.parametrize("b,h,n,dtype,padded,num_prefix,num_samples,min_tokens", DENSE_CASES)
def test_ats_dense_matches_reference(b, h, n, dtype, padded, num_prefix, num_samples, min_tokens):
    q, k, v = _qkv(b, h, n, dtype, seed=n + b + h, views=(b + h) % 2 == 0)
    valid = _padding(b, n, seed=n) if padded else None
    got = sel.ats_select_dense(q, k, v, SCALE, num_prefix, num_samples, min_tokens, valid)
    want, s_ref = _dense_ref(q, k, v, num_prefix, num_samples, min_tokens, valid)
    _assert_structure(*got, num_prefix)
    _assert_ats_equal(got, want, s_ref, n, num_samples, dtype, valid, num_prefix)
    if valid is not None:
        assert not (ref.scatter_keep(*got, n) & ~valid)[:, num_prefix:].any()


def test_ats_dense_tiled_loops(monkeypatch):
    """Small tiles, as on a GPU: the head-dim loop and several row tiles of the sampling kernel."""
    monkeypatch.setitem(sel._TILE_ELEMS, "cpu", 256)
    q, k, v = _qkv(3, 3, 37, torch.float32, seed=5)
    valid = _padding(3, 37, seed=5)
    got = sel.ats_select_dense(q, k, v, SCALE, 1, 18, 6, valid)
    want, _ = _dense_ref(q, k, v, 1, 18, 6, valid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_ats_concentrated_scores_use_the_floor():
    """One token holds nearly all the score: every sampling point lands on it, the floor adds the rest."""
    b, h, n = 3, 3, 197
    q, k, v = _qkv(b, h, n, torch.float32, seed=11, views=False)
    v[0, :, 57] *= 1e5
    v[1, :, 196] *= 1e5
    v[2, :, 1] *= 1e5
    got = sel.ats_select_dense(q, k, v, SCALE, 1, 98, 12)
    want, s_ref = _dense_ref(q, k, v, 1, 98, 12, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (s_ref.max(1).values > 0.99).all()
    assert got[1].sum(1).tolist() == [13, 13, 13]  # CLS + the floor of 12: the sampling kept fewer


@pytest.mark.parametrize("n,num_prefix", [(256, 0), (257, 1)])
@pytest.mark.parametrize("num_samples,min_tokens", [(128, 0), (100, 0), (7, 10)])
def test_ats_uniform_scores(n, num_prefix, num_samples, min_tokens):
    """All scores equal and exactly representable (attention 1/256, value norms 16): the CDF steps are
    exactly j / 256, and with K = 128 every point (2i + 1) / 256 falls exactly on a step, where only
    exact comparisons give searchsorted's count of picked steps.

    The reference's unstable sort leaves open which tokens fill the picked positions; the counts must
    equal the reference's, and the tokens follow the kernel's order (equal scores by index)."""
    b, h = 2, 4
    q = torch.zeros(b, h, n, D)
    k = torch.randn(b, h, n, D)
    v = torch.randint(0, 2, (b, h, n, D)).float() * 2 - 1  # +-1: every norm is sqrt(H * D) = 16
    valid = None
    if num_prefix:  # mask the CLS key, so the 256 patch keys share the attention: 1/256 each
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[:, 0] = False
    got = sel.ats_select_dense(q, k, v, SCALE, num_prefix, num_samples, min_tokens, valid)
    want, s_ref = _dense_ref(q, k, v, num_prefix, num_samples, min_tokens, valid)
    assert (s_ref == 1 / 256).all()
    _assert_structure(*got, num_prefix)
    assert torch.equal(got[1].sum(1), want[1].sum(1))
    # the expected tokens: searchsorted on the reference CDF; sorted position j is token j
    cdf = torch.cumsum(torch.sort(s_ref, dim=1).values, dim=1)
    points = (torch.arange(num_samples, dtype=torch.float32) + 0.5) / num_samples
    pos = torch.searchsorted(cdf, points.expand(b, num_samples).contiguous()).clamp(max=256 - 1)
    for i in range(b):
        expect = set(pos[i].tolist())
        if len(expect) < min_tokens:
            expect |= set(range(256 - min_tokens, 256))
        expect = sorted(j + num_prefix for j in expect)
        kept = got[0][i, num_prefix:][got[1][i, num_prefix:]].tolist()
        assert kept == expect
    if num_samples == 128:
        assert got[1][:, num_prefix:].sum(1).tolist() == [128, 128]  # one token per step, every other


def test_ats_padding_cannot_displace_valid_tokens():
    """Zero-score valid tokens next to zero-score padding: the floor takes valid tokens only.

    Image 0: tokens 1..4 score > 0, tokens 5..20 are valid with v = 0 (score 0), 21..36 are padding.
    Sampling can only pick tokens 1..4; the floor of 8 adds the best 4 remaining valid tokens, which
    by the kernel's tie order (equal scores by index) are 17..20 (the reference's unstable sort may
    rank padding above them and keep fewer). Image 1 has all scores 0 (v = 0): the last point is
    clamped to the last sorted position, the highest valid token (20), then the floor."""
    b, h, n = 2, 3, 37
    q, k, v = _qkv(b, h, n, torch.float32, seed=3, views=False)
    valid = torch.arange(n)[None, :].expand(b, n) <= 20
    v[0, :, 5:] = 0
    v[1] = 0
    idx, kept_valid = sel.ats_select_dense(q, k, v, SCALE, 1, 10, 8, valid)
    _assert_structure(idx, kept_valid, 1)
    kept = [idx[i][kept_valid[i]].tolist() for i in range(b)]
    assert kept[0] == [0, 1, 2, 3, 4, 17, 18, 19, 20]
    assert kept[1] == [0, 13, 14, 15, 16, 17, 18, 19, 20]


def test_ats_dense_edge_shapes():
    q, k, v = _qkv(0, 3, 13, torch.float32, seed=0)
    got = sel.ats_select_dense(q, k, v, SCALE, 1, 4, 2)
    want, _ = _dense_ref(q, k, v, 1, 4, 2, None)
    assert got[0].shape == want[0].shape == (0, 1) and got[1].shape == (0, 1)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool
    # no patch tokens (the reference raises): the prefix only
    q, k, v = _qkv(2, 3, 1, torch.float32, seed=0)
    idx, valid = sel.ats_select_dense(q, k, v, SCALE, 1, 4, 2)
    assert idx.tolist() == [[0], [0]] and valid.all()
    # K = 0 without floor: nothing kept
    q, k, v = _qkv(2, 3, 13, torch.float32, seed=0)
    got = sel.ats_select_dense(q, k, v, SCALE, 1, 0, 0)
    want, _ = _dense_ref(q, k, v, 1, 0, 0, None)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- ATS sampling stage alone, on given scores ---------------------------------------------------


@pytest.mark.parametrize("n,num_samples,min_tokens,padded,total", [
    (196, 98, 8, False, 1.0), (256, 128, 16, True, 1.0), (12, 20, 4, True, 1.0), (36, 3, 50, True, 1.0),
    (196, 49, 0, True, 1.0),
    (196, 98, 0, False, 0.6),  # scores summing to 0.6: the points above the CDF clamp to the last token
])
def test_sampling_matches_ats_select_on_scores(n, num_samples, min_tokens, padded, total):
    """The sampling and compaction kernels equal ``ats_select`` bit for bit on the same scores, from
    nearly flat to highly concentrated ones (32 images per case)."""
    gen = torch.Generator().manual_seed(n + num_samples)
    b, num_prefix = 32, 1
    logits = torch.randn(b, n, generator=gen) * torch.linspace(0.2, 6.0, b)[:, None]
    s = torch.softmax(logits, dim=1)
    valid = None
    if padded:
        lengths = torch.randint(1, n + 2, (b,), generator=gen)
        valid = torch.arange(n + 1)[None, :] < lengths[:, None]
        s = torch.where(valid[:, 1:], s, 0)
        s = s / s.sum(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    s = s * total
    got = sel._ats_select_from_scores(s, num_samples, min_tokens, num_prefix, valid)
    want = ref.ats_select(s, num_samples, min_tokens, num_prefix, valid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n,num_samples", [(196, 98), (196, 49), (196, 196), (196, 28), (255, 85), (100, 300), (13, 6)])
def test_sampling_exact_on_uniform_scores(n, num_samples):
    """Equal scores 1/n (rounded): every point (i + 0.5) / K sits on, or within an ulp of, a CDF step
    j / n, so only exact comparisons reproduce searchsorted. Positions are tie-order free: the
    count must equal the reference's, the tokens those at the picked positions in index order."""
    s = torch.full((2, n), 1.0 / n)
    got = sel._ats_select_from_scores(s, num_samples, 0, 1)
    want = ref.ats_select(s, num_samples, 0, 1)
    assert torch.equal(got[1].sum(1), want[1].sum(1))
    cdf = torch.cumsum(s, dim=1)
    points = (torch.arange(num_samples, dtype=torch.float32) + 0.5) / num_samples
    pos = torch.searchsorted(cdf, points.expand(2, num_samples).contiguous()).clamp(max=n - 1)
    for i in range(2):
        assert got[0][i][got[1][i]].tolist() == [0] + sorted(j + 1 for j in set(pos[i].tolist()))


# --- ATS, packed ---------------------------------------------------------------------------------

PACKED_CASES = [
    # h, lengths, dtype, num_samples, min_tokens  (lengths 0, 1 and the full length in each)
    (3, [197, 0, 1, 150], torch.float32, 98, 8),
    (6, [257, 1, 0, 13, 257], torch.float32, 128, 16),
    (3, [37], torch.float32, 18, 4),
    (6, [197, 1, 0, 120], torch.float16, 98, 8),
    (3, [13, 0, 1, 13], torch.float16, 6, 2),
]


@pytest.mark.parametrize("h,lengths,dtype,num_samples,min_tokens", PACKED_CASES)
def test_ats_packed_matches_reference(h, lengths, dtype, num_samples, min_tokens):
    n = max(lengths)
    q, k, v = _qkv(len(lengths), h, n, dtype, seed=n + h)
    qp, kp, vp, cu = _pack(q, k, v, lengths)
    got = sel.ats_select_packed(qp, kp, vp, cu, SCALE, 1, num_samples, min_tokens)
    want, s_ref = _packed_ref(qp, kp, vp, cu, 1, num_samples, min_tokens)
    _assert_structure(*got, 1)
    token_valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    _assert_ats_equal(got, want, s_ref, n, num_samples, dtype, token_valid)
    if dtype == torch.float32:
        # the packed path selects what the dense path selects on the same tokens, padded (fp16 rounds
        # the logits differently in the two reference chains: the dense one after the scale too)
        dense = sel.ats_select_dense(q, k, v, SCALE, 1, num_samples, min_tokens, token_valid)
        assert torch.equal(dense[0], got[0]) and torch.equal(dense[1], got[1])


def test_ats_packed_edge_cases():
    q, k, v = _qkv(3, 3, 37, torch.float32, seed=7)
    # a trailing empty image (the reference indexes past the buffer): prefix entry only, valid as
    # the reference flags the prefix of every image
    qp, kp, vp, cu = _pack(q, k, v, [37, 5, 0])
    idx, valid = sel.ats_select_packed(qp, kp, vp, cu, SCALE, 1, 18, 4)
    qp2, kp2, vp2, cu2 = _pack(q, k, v, [37, 5])
    (idx_ref, valid_ref), _ = _packed_ref(qp2, kp2, vp2, cu2, 1, 18, 4)
    assert torch.equal(idx[:2], idx_ref) and torch.equal(valid[:2], valid_ref)
    assert idx[2].tolist() == [0] * idx.shape[1] and valid[2].tolist() == [True] + [False] * (idx.shape[1] - 1)
    # no image longer than the prefix (the reference raises): prefix only
    qp, kp, vp, cu = _pack(q, k, v, [1, 0, 1])
    idx, valid = sel.ats_select_packed(qp, kp, vp, cu, SCALE, 1, 18, 4)
    assert idx.tolist() == [[0]] * 3 and valid.all()
    # no images at all
    idx, valid = sel.ats_select_packed(qp[:, :, :0], kp[:, :, :0], vp[:, :, :0], torch.zeros(1, dtype=torch.long),
                                       SCALE, 1, 18, 4)
    assert idx.shape == valid.shape == (0, 1) and idx.dtype == torch.int64 and valid.dtype == torch.bool


# --- top-k + gather ------------------------------------------------------------------------------


def _bias(kind, b, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 2)
    if kind is None:
        return None
    if kind == "mask":  # padding keys, as valid_to_bias gives them
        valid = torch.rand(b, n, generator=gen) > 0.25
        valid[:, 0] = True
        return ref.valid_to_bias(valid, dtype)
    size = torch.randint(1, 5, (1 if kind == "size1" else b, n, 1), generator=gen).float()
    return ref.size_to_bias(size).to(dtype if kind == "size" else torch.float32)  # ToMe's log(size)


def _topk_ref(x, q, k, bias, keep, num_prefix, fuse):
    cls = ref.cls_attention(q, k, SCALE, bias)
    idx = ref.topk_select(cls, keep, num_prefix)
    out = ref.gather_tokens(x, idx, 1)
    fused = None
    if fuse and keep < x.shape[1] - num_prefix:
        fused = ref.evit_fuse(x, cls, idx, num_prefix)
        out = torch.cat([out, fused], dim=1)
    return out, idx, cls


def _fused_truth(x, q, k, bias, idx, num_prefix):
    """EViT's fused token in fp64 (softmax included) for the given indices."""
    logits = torch.matmul(q[:, :, :1].double(), k.double().transpose(-2, -1)) * SCALE
    if bias is not None:
        logits = logits + bias.double()
    cls = torch.softmax(logits, dim=-1).squeeze(2)
    w = cls.mean(dim=1)
    dropped = torch.ones_like(w, dtype=torch.bool)
    dropped[:, :num_prefix] = False
    dropped.scatter_(1, idx, False)
    return torch.bmm((w * dropped).unsqueeze(1), x.double())


def _rows_of(out, x):
    """Token index of each output row (x's rows are distinct random vectors)."""
    eq = (out[:, :, None, :] == x[:, None, :, :]).all(-1)
    assert (eq.sum(-1) == 1).all(), "an output row is no row of x"
    return eq.int().argmax(-1)


TOPK_CASES = [
    # b, h, n, dtype, num_prefix, keep, fuse, bias
    (1, 3, 197, torch.float32, 1, 98, True, None),
    (3, 6, 257, torch.float32, 1, 128, True, "size"),
    (3, 3, 13, torch.float32, 1, 6, False, "mask"),
    (3, 3, 37, torch.float32, 2, 0, True, None),  # nothing kept: the fused token is every patch
    (3, 3, 37, torch.float32, 1, 36, True, None),  # everything kept: no fused token
    (3, 6, 197, torch.float16, 1, 120, True, "mask"),
    (1, 3, 37, torch.float16, 1, 20, True, "size"),
    (3, 6, 37, torch.float16, 1, 10, True, "size1"),  # fp32 bias over a batch of 1, fp16 q/k
]


@pytest.mark.parametrize("b,h,n,dtype,num_prefix,keep,fuse,bias_kind", TOPK_CASES)
def test_topk_gather_matches_reference(b, h, n, dtype, num_prefix, keep, fuse, bias_kind):
    q, k, _ = _qkv(b, h, n, dtype, seed=n + h, views=b % 2 == 1)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(b, 64 * h, n, generator=gen).to(dtype).transpose(1, 2)  # [B, N, C], strided
    bias = _bias(bias_kind, b, n, dtype, seed=n)
    out = sel.topk_gather(x, q, k, SCALE, keep, num_prefix, fuse, bias)
    want, idx_ref, cls_ref = _topk_ref(x, q, k, bias, keep, num_prefix, fuse)
    assert out.shape == want.shape and out.dtype == x.dtype
    m = num_prefix + keep
    has_fused = want.shape[1] > m
    if dtype == torch.float32:
        assert torch.equal(out[:, :m], want[:, :m])
        same = torch.ones(b, dtype=torch.bool)
    else:
        # fp16: only tokens at a near-tie with the k-th largest reference score may be swapped
        idx = _rows_of(out[:, :m], x)
        assert torch.equal(idx[:, :num_prefix], idx_ref[:, :num_prefix])
        assert (idx[:, num_prefix:].diff(dim=1) > 0).all()
        score = cls_ref.float().mean(dim=1)
        same = (idx == idx_ref).all(1)
        for i in torch.nonzero(~same).flatten().tolist():
            kth = score[i].gather(0, idx_ref[i, num_prefix:]).min()
            swapped = set(idx[i].tolist()) ^ set(idx_ref[i].tolist())
            assert all(abs(score[i, j] - kth) <= 2e-3 * kth for j in swapped), (i, swapped)
        assert torch.equal(out[same, :m], want[same, :m])
    if has_fused:
        truth = _fused_truth(x, q, k, bias, idx_ref, num_prefix)[same]
        err = (out[same, m:].double() - truth).abs().max()
        err_ref = (want[same, m:].double() - truth).abs().max()
        assert err <= 2 * err_ref + ATOL[dtype] * truth.abs().max(), (err, err_ref)


def test_topk_gather_tiled_loops(monkeypatch):
    monkeypatch.setitem(sel._TILE_ELEMS, "cpu", 256)
    q, k, _ = _qkv(3, 3, 37, torch.float32, seed=9)
    x = torch.randn(3, 37, 192)
    out = sel.topk_gather(x, q, k, SCALE, 17, 1, True)
    want, _, _ = _topk_ref(x, q, k, None, 17, 1, True)
    assert torch.equal(out[:, :18], want[:, :18])
    torch.testing.assert_close(out[:, 18:], want[:, 18:], rtol=1e-5, atol=1e-6)


def test_topk_ties_prefer_lower_index():
    """Uniform attention (q = 0): every score ties; the kernel keeps the first ``keep`` patches."""
    b, h, n, keep = 2, 3, 37, 10
    q = torch.zeros(b, h, n, D)
    k = torch.randn(b, h, n, D)
    x = torch.randn(b, n, 192)
    out = sel.topk_gather(x, q, k, SCALE, keep, 1, True)
    idx = torch.arange(keep + 1).expand(b, keep + 1)
    cls = ref.cls_attention(q, k, SCALE)
    torch.testing.assert_close(out[:, : keep + 1], ref.gather_tokens(x, idx, 1), rtol=0, atol=0)
    torch.testing.assert_close(out[:, keep + 1:], ref.evit_fuse(x, cls, idx, 1), rtol=1e-5, atol=1e-6)


def test_topk_gather_empty_batch():
    q, k, _ = _qkv(0, 3, 13, torch.float32, seed=0)
    x = torch.randn(0, 13, 192)
    assert sel.topk_gather(x, q, k, SCALE, 6, 1, True).shape == (0, 8, 192)
    assert sel.topk_gather(x, q, k, SCALE, 6, 1, False).shape == (0, 7, 192)


# --- input validation ----------------------------------------------------------------------------


def test_launchers_reject_bad_inputs():
    q, k, v = _qkv(2, 3, 13, torch.float32, seed=0)
    x = torch.randn(2, 13, 192)
    with pytest.raises(ValueError, match="4-D"):
        sel.ats_select_dense(q[0], k, v, SCALE, 1, 4, 2)
    with pytest.raises(TypeError, match="dtype"):
        sel.ats_select_dense(q, k.half(), v, SCALE, 1, 4, 2)
    with pytest.raises(ValueError, match="valid"):
        sel.ats_select_dense(q, k, v, SCALE, 1, 4, 2, torch.ones(2, 13))
    with pytest.raises(ValueError, match="num_samples"):
        sel.ats_select_dense(q, k, v, SCALE, 1, -1, 2)
    with pytest.raises(ValueError, match="packed"):
        sel.ats_select_packed(q, k, v, torch.tensor([0, 13]), SCALE, 1, 4, 2)
    with pytest.raises(ValueError, match="cu"):
        sel.ats_select_packed(q[:1], k[:1], v[:1], torch.tensor([0, 20]), SCALE, 1, 4, 2)
    with pytest.raises(TypeError, match="cu"):
        sel.ats_select_packed(q[:1], k[:1], v[:1], torch.tensor([0.0, 13.0]), SCALE, 1, 4, 2)
    with pytest.raises(ValueError, match="keep"):
        sel.topk_gather(x, q, k, SCALE, 13, 1, True)
    with pytest.raises(ValueError, match="bias"):
        sel.topk_gather(x, q, k, SCALE, 6, 1, True, torch.zeros(2, 13))
    with pytest.raises(ValueError, match="x's B"):
        sel.topk_gather(x[:1], q, k, SCALE, 6, 1, True)
