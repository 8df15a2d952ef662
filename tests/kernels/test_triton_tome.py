"""Fused ToMe matching + merge (Triton, run by the CPU interpreter) against the reference chain.

The reference is ``ref.tome_merge(x, size, *ref.tome_match(k.mean(dim=1), r, num_prefix), num_prefix)``.

* Indices (``unm``, ``src``, ``dst``) must equal the reference's exactly on fp32 random inputs, and on
  inputs built with exact ties (stable order, first maximum). On fp16 inputs both sides score the
  same fp16-rounded metric in fp32 but sum in different orders, so two scores within a few fp32 ulps
  could swap; such a swap is accepted only if the fp64 scores show a near-tie (1e-5) at the decision
  that differs, i.e. the kernel's match is still optimal up to that tolerance.
* Values are held to the error PyTorch itself makes at the input dtype: the "truth" is the reference
  merge of the inputs upcast (fp16 -> fp32, fp32 -> fp64) with the same indices; the kernel's error
  against it may be at most twice the error of the reference run at the input dtype, plus a tiny atol.
* Sizes are integers here, so the new sizes must equal the reference's exactly.
"""

import itertools

import pytest
import torch

from tokenopt.kernels import reference as ref

pytest.importorskip("triton")
from tokenopt.kernels.triton.tome import _merge_and_match, tome_match_fused, tome_merge_fused  # noqa: E402

D = 64
UP = {torch.float32: torch.float64, torch.float16: torch.float32}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-5}
NEAR_TIE = 1e-5


def _inputs(b, n, c, h, dtype, sized, views, seed):
    """x, k, size; with ``views``, x and size are strided views and k a permuted fused-qkv view."""
    gen = torch.Generator().manual_seed(seed)
    if views:
        x = torch.randn(b, c, n, generator=gen).to(dtype).transpose(1, 2)  # [B, N, C], channel stride N
        qkv = torch.randn(b, n, 3, h, D, generator=gen).to(dtype)
        k = qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, D] as attention blocks see it
    else:
        x = torch.randn(b, n, c, generator=gen).to(dtype)
        k = torch.randn(b, h, n, D, generator=gen).to(dtype)
    size = None
    if sized:
        size = torch.randint(1, 6, (b, n, 2), generator=gen).to(dtype)
        size = size[..., :1] if views else size[..., :1].contiguous()
    return x, k, size


def _scores64(k, num_prefix):
    """fp64 cosine scores of the reference's metric (k's dtype mean, as ``k.mean(dim=1)`` rounds it)."""
    m = k.mean(dim=1)[:, num_prefix:].double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return m[:, ::2] @ m[:, 1::2].transpose(-1, -2)


def _assert_valid_match(k, r, num_prefix, unm, src, dst, tol):
    """The match is optimal up to ``tol``: what an fp16 near-tie may change, and nothing else."""
    scores = _scores64(k, num_prefix)
    na = scores.shape[1]
    r = min(r, na)
    assert unm.shape == (k.shape[0], na - r) and src.shape == dst.shape == (k.shape[0], r)
    # src and unm split the A set; unm ascending
    assert torch.equal(torch.cat([src, unm], 1).sort(1).values, torch.arange(na).expand(k.shape[0], na))
    assert (unm.diff(dim=1) > 0).all()
    best = scores.max(dim=-1).values
    # each merged token went to one of its best partners
    chosen = scores.gather(1, src[..., None].expand(-1, -1, scores.shape[2])).gather(2, dst[..., None])[..., 0]
    assert (chosen >= best.gather(1, src) - tol).all()
    # merged tokens in descending best-score order, and none scores below a kept one
    merged_best = best.gather(1, src)
    assert (merged_best.diff(dim=1) <= tol).all()
    if 0 < r < na:
        assert (merged_best.min(1).values >= best.gather(1, unm).max(1).values - tol).all()


def _check(x, k, size, r, num_prefix):
    """Run the kernels and hold them to the reference (indices, values, sizes, dtypes).

    Runs :func:`tome_merge_fused` through the helper that also returns the match it used, so one
    interpreted run gives both (``test_public_launchers_agree`` ties the public launchers to it).
    """
    dtype = x.dtype
    out, out_size, (unm, src, dst) = _merge_and_match(x, k, size, r, num_prefix)
    r_unm, r_src, r_dst = ref.tome_match(k.mean(dim=1), r, num_prefix)
    ref_out, ref_size = ref.tome_merge(x, size, r_unm, r_src, r_dst, num_prefix)

    for got, want in ((unm, r_unm), (src, r_src), (dst, r_dst)):
        assert got.dtype == torch.int64 and got.shape == want.shape
    same = torch.equal(unm, r_unm) and torch.equal(src, r_src) and torch.equal(dst, r_dst)
    if dtype == torch.float32:
        assert same, "fp32 random inputs must give the reference's exact match"
    elif not same:  # fp16: only a near-tie may explain a different match
        _assert_valid_match(k, r, num_prefix, unm, src, dst, NEAR_TIE)
        ref_out, ref_size = ref.tome_merge(x, size, unm, src, dst, num_prefix)

    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert out_size.shape == ref_size.shape and out_size.dtype == ref_size.dtype
    assert torch.equal(out_size, ref_size)

    up = UP[dtype]
    truth, _ = ref.tome_merge(x.to(up), None if size is None else size.to(up), unm, src, dst, num_prefix)
    err = (out.to(up) - truth).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_out.to(up) - truth).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * ref_err + ATOL[dtype], f"kernel error {err:.3g} vs PyTorch's own {ref_err:.3g}"
    return out, out_size


# N (197 = ViT-B/16 at 224 + CLS, 257, and an odd small count) x prefix tokens x r (none, a few, all);
# batch, width/heads and given sizes run through their 8 combinations with the case number i (each
# at least twice per dtype), strided views alternate independently of them
def _cases():
    for i, (n, p, r) in enumerate(itertools.product([197, 257, 37], [1, 5], ["none", "few", "all"])):
        b, (c, h), sized = [1, 3][i % 2], [(192, 3), (384, 6)][(i // 2) % 2], bool((i // 4) % 2)
        views = bool((i // 8) % 2) ^ bool(i % 2)
        label = f"N{n}-P{p}-r_{r}-B{b}-C{c}H{h}-{'sized' if sized else 'nosize'}-{'views' if views else 'contig'}"
        yield pytest.param(n, p, r, b, (c, h), sized, views, id=label)


_CASES = list(_cases())


def _r_of(kind, n, p):
    na = (n - p + 1) // 2
    return {"none": 0, "few": 5 if n < 64 else 16, "all": na if p == 1 else 1000}[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n, num_prefix, r, b, ch, sized, views", _CASES)
def test_matches_reference(dtype, n, num_prefix, r, b, ch, sized, views):
    c, h = ch
    x, k, size = _inputs(b, n, c, h, dtype, sized, views, seed=n * 100 + num_prefix * 10 + b)
    r = _r_of(r, n, num_prefix)
    out, out_size = _check(x, k, size, r, num_prefix)
    na = (n - num_prefix + 1) // 2
    assert out.shape == (b, n - min(r, na), c)
    # sizes: every original patch is counted once
    total = torch.ones(b, n, 1) if size is None else size.float()
    assert torch.equal(out_size.float().sum(1), total.sum(1))


def test_exact_ties_follow_torch():
    """Exact ties (one-hot metrics: every score is exactly -1, 0 or 1): first maximum, also across
    B tiles (|B| = 98 > 64), and stable descending rank order with r cutting inside tied groups."""
    b, n, h, p = 2, 197, 3, 1
    gen = torch.Generator().manual_seed(7)
    dims = torch.randint(0, 3, (b, n), generator=gen)
    sign = torch.where(torch.rand(b, n, generator=gen) < 0.3, -1.0, 1.0)
    # powers of two keep the one-hot rows exact; 2^-20 rows must still normalise to norm 1 (the
    # 1e-12 clamp only guards zero rows)
    scale = 2.0 ** torch.randint(-1, 2, (b, n), generator=gen).float()
    scale[:, 5::11] = 2.0**-20
    m = torch.nn.functional.one_hot(dims, D).float() * (sign * scale)[..., None]
    m[:, 3::7] = 0.0  # zero rows: every score 0, the norm clamp keeps them 0
    k = m[:, None].expand(b, h, n, D).contiguous()
    x = torch.randn(b, n, 192, generator=gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float()
    scores = _scores64(k, p)
    is_max = scores.max(-1).values[:, :, None] == scores
    assert (is_max[..., :64].any(-1) & is_max[..., 64:].any(-1)).any(), "the test needs ties across B tiles"
    for r in (0, 7, 40, 1000):
        _check(x, k, size if r % 2 else None, r, p)


def test_fp16_metric_is_rounded_like_reference():
    """The reference's metric is ``k.mean(dim=1)`` in fp16: a kernel averaging in fp32 without rounding
    picks another partner when the rounding flips which of two B tokens is closer."""
    gen = torch.Generator().manual_seed(11)
    h, d = 3, 16

    def cos(a, bs):
        return torch.nn.functional.cosine_similarity(a[None].double(), bs.double(), dim=-1)

    for _ in range(5000):  # search for such a case (a few percent of random draws are one)
        ka = torch.randn(h, d, generator=gen).half()
        kb0 = torch.randn(h, d, generator=gen)
        kb = torch.stack([kb0, kb0 + 2e-3 * torch.randn(h, d, generator=gen)]).half()  # two close B tokens
        a16 = ka.mean(0).float()
        s_rounded = cos(a16, kb.mean(1).float())  # what the reference scores
        s_exact = cos(a16, kb.float().mean(1))
        g_rounded, g_exact = float(s_rounded[0] - s_rounded[1]), float(s_exact[0] - s_exact[1])
        if min(abs(g_rounded), abs(g_exact)) > 1e-6 and (g_rounded > 0) != (g_exact > 0):
            break
    else:
        pytest.fail("no case found where fp16 rounding of the metric flips a match")
    # tokens: [CLS, A0 = a, B0 = kb[0], A1 = random, B1 = kb[1]]
    k = torch.randn(1, h, 5, d, generator=gen).half()
    k[0, :, 1], k[0, :, 2], k[0, :, 4] = ka, kb[0], kb[1]
    x = torch.randn(1, 5, 8, generator=gen).half()
    unm, src, dst = tome_match_fused(k, 2, 1)
    assert int(dst[0, (src[0] == 0).nonzero()[0, 0]]) == (0 if g_rounded > 0 else 1)
    _check(x, k, None, 2, 1)


def test_public_launchers_agree():
    """The public launchers give what the tests' one-run helper gives, bit for bit."""
    for dtype in (torch.float32, torch.float16):
        x, k, size = _inputs(3, 37, 192, 3, dtype, True, True, seed=1)
        out, out_size, match = _merge_and_match(x, k, size, 6, 1)
        pub_out, pub_size = tome_merge_fused(x, k, size, 6, 1)
        assert torch.equal(pub_out, out) and torch.equal(pub_size, out_size)
        assert all(torch.equal(a, b) for a, b in zip(tome_match_fused(k, 6, 1), match))
        _check(x, k, size, 6, 1)


def test_empty_batch():
    for size in (None, torch.ones(0, 37, 1)):
        x, k = torch.randn(0, 37, 192), torch.randn(0, 3, 37, D)
        out, out_size = tome_merge_fused(x, k, size, 5, 1)
        assert out.shape == (0, 32, 192) and out_size.shape == (0, 32, 1) and out.dtype == torch.float32
        unm, src, dst = tome_match_fused(k, 5, 1)
        assert unm.shape == (0, 13) and src.shape == dst.shape == (0, 5)


def test_smallest_inputs():
    """Two patch tokens (|A| = |B| = 1), no prefix, odd head dim."""
    gen = torch.Generator().manual_seed(3)
    for n, p in ((2, 0), (3, 1), (4, 1)):
        x, k = torch.randn(2, n, 5, generator=gen), torch.randn(2, 2, n, 7, generator=gen)
        for r in (0, 1, 2):
            _check(x, k, None, r, p)


def test_size_dtype_promotes_like_reference():
    gen = torch.Generator().manual_seed(5)
    x, k = torch.randn(1, 37, 192, generator=gen).half(), torch.randn(1, 3, 37, D, generator=gen).half()
    size = torch.randint(1, 4, (1, 37, 1), generator=gen).float()
    out, out_size = _check(x, k, size, 6, 1)
    assert out.dtype == out_size.dtype == torch.float32


def test_bad_inputs_are_rejected():
    x, k = torch.randn(2, 37, 192), torch.randn(2, 3, 37, D)
    with pytest.raises(ValueError, match="x must be"):
        tome_merge_fused(x[0], k, None, 1, 1)
    with pytest.raises(ValueError, match="k must be"):
        tome_merge_fused(x, k[:, 0], None, 1, 1)
    with pytest.raises(ValueError, match="batch"):
        tome_merge_fused(x, k[:1], None, 1, 1)
    with pytest.raises(ValueError, match="tokens"):
        tome_merge_fused(x, k[:, :, :36], None, 1, 1)
    with pytest.raises(ValueError, match="size must be"):
        tome_merge_fused(x, k, torch.ones(2, 37), 1, 1)
    with pytest.raises(ValueError, match="r must be"):
        tome_merge_fused(x, k, None, -1, 1)
    with pytest.raises(ValueError, match="num_prefix"):
        tome_merge_fused(x, k, None, 1, 38)
    with pytest.raises(ValueError, match="at least 2 patch tokens"):
        tome_merge_fused(x, k, None, 1, 36)
    with pytest.raises(TypeError, match="x must be float"):
        tome_merge_fused(x.long(), k, None, 1, 1)
    with pytest.raises(TypeError, match="k must be float"):
        tome_match_fused(k.int(), 1, 1)
