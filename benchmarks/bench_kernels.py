"""Fused Triton token kernels against the reference op chains they replace, on a GPU.

    python benchmarks/bench_kernels.py                  # CUDA: perf_report tables + PNGs in out/kernels/
    python benchmarks/bench_kernels.py --check          # any machine: outputs only, small shapes
                                                        # (on CPU through TRITON_INTERPRET=1)

For each fused op (``torch.ops.tokenopt.*``) and the chain of references in
``tokenopt/kernels/reference.py`` it stands for, Triton's ``perf_report`` sweeps the batch size at
DeiT-Small shapes (197 tokens, 6 heads, head dim 64, fp16) and ``do_bench`` times both (median ms).
Every pair is checked for equal outputs before it is timed.

On a GPU, ``--check`` has run once (2026-12-01, one NVIDIA H200, torch 2.11.0+cu130, Triton 3.6.0): every
fused op equalled its reference chain. The timing run has not been run on a GPU yet, so no timing from
this script is quoted anywhere in the repository. ``--check`` also runs in the test suite, under the
CPU interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys


def _cases(device, dtype, b, n=197, h=6, d=64, generator=None):
    """(name, fused callable, reference callable) at batch ``b``, ``n`` tokens, ``h`` heads."""
    import torch

    from tokenopt.kernels import fused, reference as ref

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    scale = d ** -0.5
    x = randn(b, n, h * d)
    qkv = randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # views of one projection, as in the models
    q, k, v = qkv[0], qkv[1], qkv[2]
    lengths = torch.randint(n // 3, n + 1, (b,), generator=generator)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    t = int(cu[-1])
    pq, pk, pv = (randn(1, h, t, d) for _ in range(3))
    keep = int(0.7 * (n - 1))

    def ats_ref():
        cls = ref.cls_attention(q, k, scale)
        return ref.ats_select(ref.ats_scores(cls, v, 1), n // 2, 8, 1)

    def ats_packed_ref():
        cls, vn, valid = ref.packed_cls_scores(pq, pk, pv, cu, scale)
        return ref.ats_select(ref.ats_scores_from_norms(cls, vn, 1, valid), n // 2, 8, 1, valid)

    def topk_ref():
        cls = ref.cls_attention(q, k, scale)
        idx = ref.topk_select(cls, keep, 1)
        return torch.cat([ref.gather_tokens(x, idx, 1), ref.evit_fuse(x, cls, idx, 1)], dim=1)

    def tome_ref():
        unm, src, dst = ref.tome_match(k.mean(dim=1), 16, 1)
        return ref.tome_merge(x, None, unm, src, dst, 1)

    flat = torch.nonzero(torch.rand(b * n, generator=generator) < 0.6).squeeze(1).to(device)
    tk = torch.ops.tokenopt
    return [
        ("ats_select_dense", lambda: tk.triton_ats_select_dense(q, k, v, scale, 1, n // 2, 8, None), ats_ref),
        ("ats_select_packed", lambda: tk.triton_ats_select_packed(pq, pk, pv, cu, scale, 1, n // 2, 8), ats_packed_ref),
        ("topk_gather", lambda: tk.triton_topk_gather(x, q, k, scale, keep, 1, True, None), topk_ref),
        ("tome_merge", lambda: tk.triton_tome_merge(x, k, None, 16, 1), tome_ref),
        ("gather_packed", lambda: tk.triton_gather_packed(x, flat), lambda: ref.gather_packed(x, flat)),
        ("unpack_padded", lambda: tk.triton_unpack_padded(pq, cu), lambda: ref.unpack_padded(pq, cu)),
        ("varlen_attention", lambda: tk.triton_varlen_attention(pq, pk, pv, cu, cu, scale),
         lambda: ref.varlen_attention(pq, pk, pv, cu, cu, scale)),
    ], fused


def check(device: str, dtype, batches=(1, 3)) -> None:
    """Every fused op equals its reference chain (what the timing run checks before timing)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    for b in batches:
        cases, _ = _cases(device, dtype, b, n=37, h=3, generator=gen)
        for name, fused, reference in cases:
            got, want = fused(), reference()
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)
            print(f"batch {b}: {name}: fused == reference")


def timing(out_dir: str) -> None:
    import torch
    import triton
    import triton.testing

    names = [c[0] for c in _cases("cuda", torch.float16, 1)[0]]

    @triton.testing.perf_report([
        triton.testing.Benchmark(
            x_names=["batch"], x_vals=[8, 32, 64, 128], line_arg="impl", line_vals=["fused", "reference"],
            line_names=["fused Triton op", "reference chain"], ylabel="ms", plot_name=f"tokenopt-{name}",
            args={"name": name},
        )
        for name in names
    ])
    def bench(batch, impl, name):
        cases = {c[0]: c for c in _cases("cuda", torch.float16, batch)[0]}
        _, fused, reference = cases[name]
        return triton.testing.do_bench(fused if impl == "fused" else reference)

    bench.run(print_data=True, save_path=out_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare outputs only, small shapes, any device")
    ap.add_argument("--out", default="out/kernels")
    args = ap.parse_args(argv)
    import torch

    if args.check:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            # the interpreter must be on before triton is imported: re-run this script with it set
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.argv])
        check("cuda" if torch.cuda.is_available() else "cpu", torch.float32)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: timing needs a GPU (run with --check to compare outputs on the CPU interpreter)")
        return 1
    os.makedirs(args.out, exist_ok=True)
    timing(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
