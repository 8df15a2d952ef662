import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: with -n 2 on this 2-core machine, two threads each oversubscribe the cores
    torch.set_num_threads(1)


# Whole files of slow tests (the Triton interpreter, training runs, benchmark scripts), marked here rather than
# test by test; the fast subset (-m "not slow") keeps the short version of each named in FAST.
SLOW_FILES = ("tests/kernels/test_triton_attention.py", "tests/kernels/test_triton_select.py",
              "tests/kernels/test_triton_tome.py", "tests/kernels/test_fused_model.py", "tests/test_train.py",
              "tests/test_benchmarks.py")
FAST = {"test_a_log_file_gets_the_epochs_running_means", "test_bench_policies_runs_and_writes_json",
        "test_bench_kernels_without_a_gpu_says_so"}


def pytest_collection_modifyitems(config, items):
    """Mark SLOW_FILES slow, then put the longest tests first (compiles in fresh processes), so the two workers
    of ``-n 2`` finish together rather than one waiting on a long test collected last."""
    for item in items:
        if item.nodeid.startswith(SLOW_FILES) and item.originalname not in FAST:
            item.add_marker(pytest.mark.slow)
    first = ("tests/test_release.py", "tests/kernels/test_fused_model.py", "tests/test_train.py", "tests/test_memory.py")
    items.sort(key=lambda item: not any(item.nodeid.startswith(f) for f in first))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
