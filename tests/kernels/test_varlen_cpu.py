"""On a CPU the varlen attention op runs one SDPA per image (``varlen_attention_segments``); it must give
what the batched padded form (the spec, used elsewhere) gives, on irregular and empty images."""

import torch

from tokenopt.kernels import reference as ref


def test_segments_equal_the_padded_form_packed_keys():
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 3, 10, 17, 18])  # an empty image, a one-token image
    q, k, v = (torch.randn(1, 3, 18, 8) for _ in range(3))
    want = ref.varlen_attention_padded(q, k, v, cu, cu, 7, 7, 0.3)
    torch.testing.assert_close(ref.varlen_attention_segments(q, k, v, cu, cu, 0.3), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.ops.tokenopt.varlen_attention(q, k, v, cu, cu, 7, 7, 0.3), want,
                               atol=1e-6, rtol=1e-5)


def test_segments_equal_the_padded_form_dense_keys_with_bias():
    torch.manual_seed(1)
    cu_q = torch.tensor([0, 2, 7, 7, 12])
    q = torch.randn(1, 2, 12, 4)
    k, v = torch.randn(4, 2, 9, 4), torch.randn(4, 2, 9, 4)
    bias = torch.zeros(4, 1, 1, 9).masked_fill(torch.rand(4, 1, 1, 9) < 0.3, float("-inf"))
    bias[..., 0] = 0.0  # every image keeps a key
    want = ref.varlen_attention_padded(q, k, v, cu_q, None, 5, 9, 0.5, bias)
    torch.testing.assert_close(ref.varlen_attention_segments(q, k, v, cu_q, None, 0.5, bias), want,
                               atol=1e-6, rtol=1e-5)
