import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker: with -n 2 on this 2-core machine, two threads each oversubscribe the cores
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The longest tests first (compiles in fresh processes), so the two workers of ``-n 2`` finish together
    rather than one waiting on a long test collected last."""
    first = ("tests/test_release.py", "tests/kernels/test_fused_model.py", "tests/test_train.py")
    items.sort(key=lambda item: not any(item.nodeid.startswith(f) for f in first))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
