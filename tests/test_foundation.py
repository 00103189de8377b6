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


class _FakeCudaTensor:
    """Stands in for a CUDA tensor on a machine without one (use_kernel only looks at is_cuda/device)."""
    is_cuda = True
    device = "cuda:0"


def test_unsupported_call_on_gpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "EXT_LOADED", True)
    monkeypatch.setattr(_backend, "_warned", set())
    t = _FakeCudaTensor()
    with pytest.warns(UserWarning, match="PyTorch fallback .head_dim 96"):
        assert not _backend.use_kernel("flash_attention", [t], "head_dim 96 is not compiled")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second identical fallback must not warn again
        assert not _backend.use_kernel("flash_attention", [t], "head_dim 96 is not compiled")
    assert _backend.use_kernel("flash_attention", [t, None], None)
    with gptkernels.backend("kernel"), pytest.raises(ValueError, match="does not support this call: head_dim 96"):
        _backend.use_kernel("flash_attention", [t], "head_dim 96 is not compiled")


def test_gpu_without_extension_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "EXT_LOADED", False)
    monkeypatch.setattr(_backend, "EXT_ERROR", "No module named 'gptkernels._C'")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="extension is not built"):
        assert not _backend.use_kernel("layer_norm", [_FakeCudaTensor()])
    with gptkernels.backend("kernel"), pytest.raises(RuntimeError, match="not built"):
        _backend.use_kernel("layer_norm", [_FakeCudaTensor()])


def test_decide_is_the_three_path_rule():
    d = _backend.decide
    assert d(True, None, mode="auto", ext_loaded=True) == "kernel"
    assert d(True, "head_dim 96", mode="auto", ext_loaded=True) == "torch"
    assert d(True, None, mode="auto", ext_loaded=False) == "torch"   # a GPU without the extension
    assert d(False, None, mode="auto", ext_loaded=True) == "reference"
    assert d(True, None, mode="reference", ext_loaded=True) == "reference"
    assert d(True, None, mode="kernel", ext_loaded=True) == "kernel"


def test_path_on_a_gpu_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(_backend, "EXT_LOADED", True)
    monkeypatch.setattr(_backend, "_warned", set())
    t = _FakeCudaTensor()
    with pytest.warns(UserWarning, match="PyTorch fallback"):
        assert _backend.path("layer_norm", [t], "normalized size 20000") == "torch"
    assert _backend.path("layer_norm", [torch.randn(2)], None) == "reference"
    with gptkernels.backend("reference"):
        assert _backend.path("layer_norm", [t], None) == "reference"


def test_image_missing_follows_cuda_binary_compatibility():
    m = _backend.image_missing
    assert m((8, 0), "80;90a", None) is None
    assert m((8, 6), "80;90a", None) is None          # sm_80 code runs on sm_86
    assert m((9, 0), "80;90a", None) is None          # sm_90a on an H100/H200
    assert "sm_100" in m((10, 0), "80;90a", None)     # no PTX: no code for a newer major version
    assert m((10, 0), "80;90a", "90") is None         # PTX for compute_90 is JIT-compiled there
    assert "sm_75" in m((7, 5), "80;90a", "90")       # PTX never runs on an older GPU
    assert "sm_90" in m((9, 0), "80", None)


@pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
def test_limits_come_from_the_extension():
    """Every family's limits are exported once by the extension (csrc/<family>/<family>_limits.h)."""
    from gptkernels import _limits
    for fam in ("activation", "attention", "gemm", "layernorm", "loss", "mlp"):
        assert _limits.dtypes(_limits.family(fam)), fam
    att = _limits.family("attention")
    assert att["max_head_dim"] == max(att["head_dims"]) and att["head_dim_multiple"] > 0
    assert _limits.family("layernorm")["max_cols"] >= _limits.family("layernorm")["min_cols"] == 1
    assert torch.bfloat16 in _limits.dtypes(att) and torch.float32 not in _limits.dtypes(att)


@pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
def test_info_implementation_per_op():
    """What each op would run, per GPU: the C++ select_impl for attention, the build's archs for all."""
    impl = info_mod.implementation
    build = {"archs": "80;90a", "ptx": "90"}
    # (on 9.0 the line goes on to name the opt-in sm90 forward: tests/test_attention.py)
    assert impl("attention fwd", capability=(9, 0), mode="auto", build=build).startswith("sm80 mma.sync kernel")
    assert impl("attention fwd", capability=(8, 0), mode="auto", build=build) == "sm80 mma.sync kernel"
    assert impl("attention decode", capability=(8, 0), mode="auto", build=build) == "sm80 split-KV decode kernel"
    assert impl("attention bwd", capability=(10, 0), mode="auto", build=build) == "sm80 mma.sync kernel"
    assert impl("attention fwd", capability=(7, 5), mode="auto", build=build).startswith("torch SDPA fallback")
    assert impl("layer_norm / add_layer_norm", capability=(9, 0), mode="auto", build=build) == "CUDA kernel"
    assert impl("layer_norm / add_layer_norm", capability=None, mode="auto", build=build) == \
        "reference (no CUDA device)"
    assert impl("cross_entropy", capability=(9, 0), mode="auto", ext_loaded=False, build=build).startswith(
        "torch F.cross_entropy fallback")
    assert impl("FusedMLP / fused_mlp", capability=(9, 0), mode="reference", build=build) == \
        "reference (backend=reference)"


@pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
def test_attention_impl_env_override(monkeypatch):
    """GPTKERNELS_ATTENTION_IMPL names an implementation (select_impl in csrc/attention/flash_api.cu);
    an unknown name is a clear error listing the known ones, shown by info instead of a traceback."""
    build = {"archs": "80;90a", "ptx": "90"}
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm80")
    assert torch.ops.gptkernels.attention_impl("fwd", 90) == "sm80 mma.sync kernel"
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm99")
    with pytest.raises(RuntimeError, match="expected one of auto, sm80"):
        torch.ops.gptkernels.attention_impl("fwd", 90)
    assert info_mod.implementation("attention fwd", capability=(9, 0), mode="auto", build=build).startswith("error:")


def test_benchmark_harness_smoke(tmp_path):
    """The harness runs a case end to end on the CPU and writes JSON, CSV and a chart."""
    import json
    from benchmarks import harness

    def factory():
        x = torch.randn(64, 32, requires_grad=True)
        return (lambda: torch.nn.functional.gelu(x)), [x]

    case = harness.Case(op="smoke", name="N64", params={"N": 64}, providers={"torch": factory, "same": factory},
                        modes=("fwd", "bwd", "fwd+bwd"), bytes=lambda mode: 2 * 64 * 32 * 4)
    rows = harness.run_case(case, warmup=1, rep=3, log=lambda s: None)
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"} and all("gbps" in r for r in rows)
    assert all(r["speedup_vs_torch"] > 0 for r in rows)
    paths = harness.write_results(rows, str(tmp_path), "smoke")
    d = json.load(open(paths["json"]))
    assert d["env"]["torch"] == torch.__version__ and len(d["rows"]) == 6
    assert os.path.getsize(paths["png:smoke"]) > 1000
