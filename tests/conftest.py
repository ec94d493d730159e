"""Test harness. Without a GPU the Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1,
set here before any kernel module is imported); launcher outputs are NaN-poisoned so unwritten elements fail."""
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLAYERS_POISON", "1")

import pytest  # noqa: E402

from fastlayers.testing import check_dtypes  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs in scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: the GPU if there is one, else CPU tensors in the interpreter."""
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Kernel dtypes testable here: the interpreter computes bf16 arithmetic wrongly (../shared/DESIGN.md), so bf16
# numerics are tested on the GPU only.
KERNEL_DTYPES = check_dtypes("cuda" if ON_GPU else "cpu")
