"""The package's foundation: extension build, backend selection, info, CLI."""
import os
import subprocess
import sys

import pytest
import torch

import gptkernels
from gptkernels import _backend, _info as info_mod


def test_extension_required_in_ci():
    """Where the build is required (CI sets GPTKERNELS_REQUIRE_EXT=1), _C must load and every op
    must have its CUDA implementation registered."""
    if os.environ.get("GPTKERNELS_REQUIRE_EXT") != "1":
        pytest.skip("GPTKERNELS_REQUIRE_EXT is not set")
    assert _backend.EXT_LOADED, f"gptkernels._C failed to load: {_backend.EXT_ERROR}"
    missing = [op for ops in info_mod.KERNEL_OPS.values() for op in ops if not _backend.has_kernel(op)]
    assert not missing, f"ops without a CUDA implementation: {missing}"
    b = info_mod.build_info()
    assert b["archs"] == os.environ.get("GPTKERNELS_CUDA_ARCHS", b["archs"]), b


def test_backend_modes():
    assert gptkernels.get_backend() == "auto"
    with gptkernels.backend("reference"):
        assert gptkernels.get_backend() == "reference"
    assert gptkernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        gptkernels.set_backend("fast")


def test_kernel_mode_on_cpu_raises():
    x, b = torch.randn(4, 8), torch.randn(8)
    with gptkernels.backend("kernel"), pytest.raises(RuntimeError, match="CUDA tensors"):
        gptkernels.nn.functional.bias_gelu(x, b)


def test_reference_mode_never_uses_kernels():
    assert not _backend.use_kernel("anything", [torch.randn(2)])
    with gptkernels.backend("reference"):
        assert not _backend.use_kernel("anything", [torch.randn(2)])


def test_info_reports_build(capsys):
    d = gptkernels.info()
    out = capsys.readouterr().out
    assert "torch" in out and "extension gptkernels._C" in out
    assert d["extension_built"] == _backend.EXT_LOADED
    if _backend.EXT_LOADED:
        assert d["extension_archs"] and "built for sm_" in out


def test_cli_info_runs():
    p = subprocess.run([sys.executable, "-m", "gptkernels", "info"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "extension gptkernels._C" in p.stdout
