"""What a stranger's install and CI see: importing tokenopt leaves torch's global tables alone, every policy's
graph compiles under ``CI=true`` with cold caches, and the built wheel installs and runs on its own."""

import glob
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "compile_every_policy.py")

SNAPSHOT = textwrap.dedent("""
    import importlib, pkgutil, sys
    import torch, torch._decomp
    import torch._inductor.config, torch._inductor.decomposition, torch._inductor.lowering

    def snapshot():
        lowering = torch._inductor.lowering
        return {
            "decomposition_table": sorted(map(str, torch._decomp.decomposition_table)),
            "global_decomposition_table": {k: sorted(map(str, v))
                                           for k, v in torch._decomp.global_decomposition_table.items()},
            "inductor decompositions": sorted(map(str, torch._inductor.decomposition.decompositions)),
            "inductor lowerings": sorted(map(str, lowering.lowerings)),
            "inductor fallbacks": sorted(map(str, lowering.fallbacks)),
            "inductor config": repr(sorted(torch._inductor.config.get_config_copy().items(), key=str)),
            "dynamo config": repr(sorted(torch._dynamo.config.get_config_copy().items(), key=str)),
        }

    before = snapshot()
    import tokenopt
    for mod in pkgutil.walk_packages(tokenopt.__path__, "tokenopt."):  # every module, the kernels too
        if not mod.name.startswith("tokenopt.kernels.triton"):
            importlib.import_module(mod.name)
    import timm
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8).eval()
    for policy in ("tome", "pitome", "topk", "ats"):
        tokenopt.optimize(model, policy=policy)
    after = snapshot()
    changed = [k for k in before if before[k] != after[k]]
    print("changed:", changed)
    sys.exit(1 if changed else 0)
""")


def test_import_and_optimize_leave_torch_global_tables_as_they_were():
    run = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0 and "changed: []" in run.stdout, run.stdout + run.stderr[-3000:]


def test_decompositions_are_a_table_tokenopt_passes_not_a_global_one():
    import torch
    import torch._decomp

    from tokenopt.kernels.ops import PACKED, REFERENCES, decompositions

    table = decompositions()
    names = {op.name().split("::")[1] for op in table}
    assert names == set(REFERENCES) - PACKED and "pitome_slots" in names and "tome_slots" in names
    assert not any(op in torch._decomp.decomposition_table for op in table)
    assert {op.name().split("::")[1] for op in decompositions(include_packed=True)} == set(REFERENCES)


def _cold_ci_env(tmp_path) -> dict:
    env = dict(os.environ, CI="true", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               TRITON_CACHE_DIR=str(tmp_path / "triton"), PYTHONPATH=ROOT)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # (one thread, as the worker that starts it: -n 2 on 2 cores)
        env["OMP_NUM_THREADS"] = "1"
    env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
    return env


def test_every_policy_compiles_with_ci_set_and_cold_caches(tmp_path):
    """``CI=true`` makes inductor refuse a fallback for any op with a global decomposition; empty caches make
    it lower every graph anew, as a stranger's CI does. The short version: one policy."""
    run = subprocess.run([sys.executable, SCRIPT, "topk"], capture_output=True, text=True,
                         env=_cold_ci_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.split("\n")[:1] == ["ok topk"]


@pytest.mark.slow
def test_every_policy_compiles_at_two_batch_sizes_with_each_dynamic_setting(tmp_path):
    """Every policy, ``torch.compile(fullgraph=True)`` with ``CI=true`` and cold caches, at two batch sizes;
    the dynamic setting rotates over torch's default, ``dynamic=True`` and ``dynamic=False`` (ToMe under two:
    with tokenopt's decompositions in torch's global table, its second batch size failed, "Attempt to trace
    generator")."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        from compile_every_policy import cases
    finally:
        sys.path.pop(0)
    suffixes = ["", "@dynamic", "@static"]
    items = [name + suffixes[i % 3] for i, name in enumerate(cases())] + ["tome@dynamic"]
    run = subprocess.run([sys.executable, SCRIPT, *items], capture_output=True, text=True, env=_cold_ci_env(tmp_path),
                         timeout=1500)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert [line[3:] for line in run.stdout.splitlines() if line.startswith("ok ")] == items


QUICKSTART = textwrap.dedent("""
    import os, sys, torch, timm, tokenopt
    assert "site-packages" in tokenopt.__file__ and not tokenopt.__file__.startswith(sys.argv[1]), tokenopt.__file__
    model = timm.create_model("deit_tiny_patch16_224", depth=2).eval()
    gm = tokenopt.optimize(model, policy="tome", r=13)
    x = torch.randn(2, 3, 224, 224)
    y = gm(x)
    assert y.shape == (2, 1000)
    counts = tokenopt.token_counts(gm, x)
    assert counts[0].tolist() == [197 - 13] * 2, counts
    print("quickstart ok", tokenopt.__version__)
""")


@pytest.mark.slow
def test_the_wheel_installs_into_a_clean_venv_and_runs(tmp_path):
    """``python -m build`` makes a wheel and an sdist; the wheel, installed into a fresh venv (no editable
    install, the checkout not on ``sys.path``), runs the quickstart and ``tokenopt --help``."""
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), ROOT],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "deprecat" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    import tokenopt

    wheels = glob.glob(str(dist / f"tokenopt_vit-{tokenopt.__version__}-*.whl"))
    sdists = glob.glob(str(dist / f"tokenopt_vit-{tokenopt.__version__}.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, timm) come from this interpreter's site-packages through a path entry; a .pth
    # line adds a folder without running the .pth files inside it, so the checkout's editable hook stays off
    import torch

    deps = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(deps + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-index", "--quiet", wheels[0]], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    quick = subprocess.run([str(venv / "bin" / "python"), "-c", QUICKSTART, ROOT], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=600)
    assert quick.returncode == 0 and f"quickstart ok {tokenopt.__version__}" in quick.stdout, quick.stdout + quick.stderr
    cli = subprocess.run([str(venv / "bin" / "tokenopt"), "--help"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert cli.returncode == 0 and "usage: tokenopt" in cli.stdout and "optimize" in cli.stdout, cli.stdout + cli.stderr
    version = subprocess.run([str(venv / "bin" / "tokenopt"), "--version"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=300)
    assert version.stdout.strip() == f"tokenopt {tokenopt.__version__}", version.stdout + version.stderr
