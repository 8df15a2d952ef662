"""Variable-length attention on this CPU: which implementation tokenopt's packed path should use.

    python benchmarks/bench_varlen_attention.py [--batch 32 --heads 6 --min-len 60 --max-len 197]

Compares, on the same packed q/k/v (DeiT-Small heads, per-image lengths drawn uniformly):
  loop       SDPA image by image on slices of the packed buffer (tokenopt's reference varlen_attention)
  padded     pad to the longest image, one SDPA with a key mask
  bucketed   sort images by length, pad within buckets of 8, one masked SDPA per bucket
  nested     nested jagged tensors (torch.nested, layout=torch.jagged) through SDPA
All outputs are checked against the loop before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenopt.kernels import reference as ref


def padded(q, k, v, cu, scale, order=None):
    qp, valid = ref.unpack_padded(q, cu)
    kp, _ = ref.unpack_padded(k, cu)
    vp, _ = ref.unpack_padded(v, cu)
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=valid[:, None, None, :], scale=scale)
    return ref.gather_packed(o, torch.nonzero(valid.flatten()).squeeze(1))


def bucketed(q, k, v, cu, scale, bucket=8):
    lengths = (cu[1:] - cu[:-1])
    order = torch.argsort(lengths)
    out = torch.empty_like(q)
    for s in range(0, len(order), bucket):
        ids = order[s:s + bucket]
        rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in ids.tolist()])
        sub_len = lengths[ids]
        sub_cu = torch.cat([torch.zeros(1, dtype=torch.long), sub_len.cumsum(0)])
        out[:, :, rows] = padded(q[:, :, rows], k[:, :, rows], v[:, :, rows], sub_cu, scale)
    return out


def nested(q, k, v, cu, scale):
    def nt(t):
        return torch.nested.nested_tensor_from_jagged(t[0].transpose(0, 1).contiguous(), cu).transpose(1, 2)

    o = F.scaled_dot_product_attention(nt(q), nt(k), nt(v), scale=scale)
    return o.transpose(1, 2).values().transpose(0, 1).unsqueeze(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=197)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    t = int(cu[-1])
    q, k, v = (torch.randn(1, args.heads, t, args.head_dim, generator=gen) for _ in range(3))
    scale = args.head_dim ** -0.5
    impls = {
        "loop": lambda: ref.varlen_attention(q, k, v, cu, cu, scale),
        "padded": lambda: padded(q, k, v, cu, scale),
        "bucketed": lambda: bucketed(q, k, v, cu, scale),
        "nested": lambda: nested(q, k, v, cu, scale),
    }
    with torch.no_grad():
        expected = impls["loop"]()
        times = {}
        for name, fn in impls.items():
            try:
                torch.testing.assert_close(fn(), expected, atol=1e-5, rtol=1e-4)
            except Exception as exc:  # report, do not hide
                print(f"{name}: not usable here ({type(exc).__name__}: {str(exc).splitlines()[0]})")
                continue
            times[name] = []
        for _ in range(args.rounds):
            for name in times:
                start = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - start)
    print(f"batch {args.batch}, heads {args.heads}, lengths {args.min_len}..{args.max_len} (total {t} tokens), "
          f"{torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"  {name:9s} median {statistics.median(ts) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
