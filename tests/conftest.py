import os

import pytest
import torch

# The tests check the kernels themselves: no self-test verdicts (set GPTKERNELS_SELFTEST to override).
os.environ.setdefault("GPTKERNELS_SELFTEST", "off")

import gptkernels
from gptkernels import _backend

CUDA_OK = torch.cuda.is_available() and _backend.EXT_LOADED


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    why = "no CUDA device" if not torch.cuda.is_available() else "the CUDA extension is not built"
    skip = pytest.mark.skip(reason=f"needs a GPU and the built extension ({why})")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_backend():
    """Every test starts in auto mode with a fixed seed."""
    gptkernels.set_backend(os.environ.get("GPTKERNELS_BACKEND", "auto"))
    torch.manual_seed(0)
    yield
    gptkernels.set_backend("auto")
