"""The self-test machinery (gptkernels._selftest) on the CPU: a deliberately broken kernel is caught
and its family disabled, verdicts are cached per GPU identity and invalidated when it changes, the
GPTKERNELS_SELFTEST modes, which path each op takes when its family failed, and the no-GPU message.

On the CPU, torch.ops.gptkernels.* run their reference implementations, so a check run with the real
ops on "cpu" must pass, and one with an injected broken op must fail. GPU identities are faked.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import gptkernels
from gptkernels import _backend
from gptkernels._selftest import rule, state
from gptkernels._selftest.families import FAMILIES, OP_FAMILY
from gptkernels._selftest.run import selftest

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
FAKE = state.Identity("Fake GPU", "9.0", "550.54", "2.x (CUDA 13.0)", "0123456789abcdef")


class Ops:
    """torch.ops.gptkernels with some ops replaced."""

    def __init__(self, **replaced):
        self.replaced = replaced

    def __getattr__(self, name):
        return self.replaced[name] if name in self.replaced else getattr(torch.ops.gptkernels, name)


def _broken_bias_act_fwd(x, bias, activation):
    y = torch.ops.gptkernels.bias_act_fwd(x, bias, activation).clone()
    y[..., -1] = 0  # a tail the kernel forgot
    return y


BROKEN = Ops(bias_act_fwd=_broken_bias_act_fwd)


def make(tmp_path, kernels=None, identity=FAKE, mode="auto"):
    return state.Verifier(identity=lambda device: identity, kernels=kernels, cache=state.Cache(tmp_path), mode=mode)


def fake_cuda(device=CPU):
    """What use_kernel sees of a CUDA tensor; its device is the CPU so that a check can really run."""
    return types.SimpleNamespace(is_cuda=True, device=device)


@pytest.fixture
def hook(monkeypatch):
    """Install a verifier as _backend's hook for one test; reset _backend's warn-once memory."""
    monkeypatch.setattr(_backend, "_warned", set())

    def install(v):
        monkeypatch.setattr(_backend, "_verifier", v.reason)
        return v
    return install


# ---- the rule -------------------------------------------------------------------------------------

def test_rule_bound_and_errors():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    base = torch.tensor([1.0, -2.0, 4.25], dtype=torch.float64)
    err, bound = rule.compare(ref + 0.4, ref, base, torch.bfloat16, floor_ulps=2.0)
    assert err == pytest.approx(0.4)
    assert bound == pytest.approx(2 * 0.25 + 2 * 2.0**-8 * 4.0)
    assert rule.max_err(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0])) != \
        rule.max_err(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))  # NaN
    inf = float("inf")
    assert rule.max_err(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 1.0])) == 0.0
    assert rule.max_err(torch.tensor([inf, 1.0]), torch.tensor([-inf, 1.0])) == inf
    zero = torch.zeros(3)
    assert rule.baseline_bound(zero, zero, torch.float16) == pytest.approx(2 * 2.0**-11)  # all-zero: scale 1
    assert rule.baseline_bound(zero, zero, torch.float16, min_scale=4.0) == pytest.approx(2 * 2.0**-11 * 4)
    with pytest.raises(ValueError, match="shape"):
        rule.compare(torch.zeros(2), torch.zeros(3), torch.zeros(3), torch.float16)


# ---- the checks themselves -------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_quick_check_passes_with_the_reference_ops(name):
    """The CPU implementation of every op is its reference: the rule must not reject it."""
    results = FAMILIES[name].check(torch.ops.gptkernels, CPU, quick=True)
    assert results and all(r.family == name for r in results)
    assert {r.case.split()[0] for r in results} == {"bf16", "fp16"}  # both half dtypes
    bad = [f"{r.label()}: {r.problem()}" for r in results if not r.ok]
    assert not bad, bad


@pytest.mark.parametrize("name,op,bad", [
    ("bias_act", "bias_act_bwd", lambda dy, x, b, a: (torch.zeros_like(x), torch.zeros_like(b))),
    ("layer_norm", "layer_norm_fwd", lambda x, w, b, eps: torch.ops.gptkernels.layer_norm_fwd(x, w, None, eps)),
    ("layer_norm", "add_layer_norm_fwd",
     lambda r, x, w, b, eps: torch.ops.gptkernels.add_layer_norm_fwd(r, r, w, b, eps)),
    ("cross_entropy", "cross_entropy_scale_grad_", lambda g, s: None),  # the backward forgets to scale
    ("linear_cross_entropy", "linear_cross_entropy_fwd",
     lambda *a: torch.ops.gptkernels.linear_cross_entropy_fwd(*a[:5], "sum", *a[6:])),  # wrong reduction
    ("mlp", "mlp_fwd", lambda x, w1, b1, w2, b2, act, s: torch.ops.gptkernels.mlp_fwd(x, w1, b1, w2, None, act, s)),
    ("attention", "flash_attn_fwd", lambda q, k, v, causal, scale, *a: torch.ops.gptkernels.flash_attn_fwd(
        q, k, v, causal, scale * 1.05, *a)),
    ("attention", "flash_attn_bwd", lambda dout, q, k, v, *a: torch.ops.gptkernels.flash_attn_bwd(dout, q, v, k, *a)),
    ("attention", "flash_attn_decode", lambda q, k, v, causal, scale, layout, kv_lens, *variant:
     torch.ops.gptkernels.flash_attn_fwd(q, k, v, causal, scale, layout, None, False, *variant)),  # ignores kv_lens
    ("attention", "flash_attn_varlen_fwd", lambda q, k, v, cu_q, cu_k, mq, mk, *a:
     torch.ops.gptkernels.flash_attn_varlen_fwd(q, k, v, cu_q[[0, -1]], cu_k[[0, -1]], q.shape[0], k.shape[0], *a)),
    # (one sequence: attends across the boundaries)
])
def test_quick_check_catches_a_broken_kernel(name, op, bad):
    results = FAMILIES[name].check(Ops(**{op: bad}), CPU, quick=True)
    bad = [r for r in results if not r.ok]
    assert bad, [r.problem() for r in results]
    assert all(r.error is None and not r.err <= r.bound for r in bad), [r.problem() for r in bad]  # by the rule


def test_a_kernel_that_raises_or_returns_nan_fails_its_case():
    def raises(*a):
        raise RuntimeError("gptkernels attention: the kernels need an sm_80 or newer GPU\nsecond line")

    results = FAMILIES["attention"].check(Ops(flash_attn_decode=raises), CPU, quick=True)
    dec = [r for r in results if r.impl == "flash_attn_decode"]
    assert dec and not any(r.ok for r in dec)
    assert dec[0].problem() == "RuntimeError: gptkernels attention: the kernels need an sm_80 or newer GPU"
    nan = Ops(bias_act_fwd=lambda x, b, a: torch.full_like(x, float("nan")))
    r = FAMILIES["bias_act"].check(nan, CPU, quick=True)[0]
    assert not r.ok and r.output == "y" and "error nan" in r.problem()


# ---- the verifier: a broken family is disabled ------------------------------------------------------

def test_broken_family_is_disabled_cached_and_checked_once(tmp_path):
    v = make(tmp_path, BROKEN)
    why = v.reason("bias_act", CPU)
    assert why is not None and why.startswith("failed the self-test on Fake GPU (sm_90): bias_act_fwd/bwd bf16 ")
    assert re.search(r": y error [0-9.e+-]+ > bound [0-9.e+-]+", why), why
    assert v.reason("bias_act", CPU) == why and v.runs == [("bias_act", FAKE.key())]  # once per process
    assert v.reason("layer_norm", CPU) is None  # the other families are unaffected
    assert v.reason("add_layer_norm", CPU) is None and len(v.runs) == 2  # same family: no second check
    data = json.loads((tmp_path / "selftest" / f"{FAKE.key()}.json").read_text())
    assert data["identity"] == dataclasses.asdict(FAKE)
    assert data["families"]["bias_act"]["ok"] is False and data["families"]["layer_norm"]["ok"] is True
    assert data["families"]["bias_act"]["scope"] == "quick"
    # a new process (a new verifier) reads the verdicts instead of checking again
    v2 = make(tmp_path, BROKEN)
    assert v2.reason("bias_act", CPU) == why and v2.reason("layer_norm", CPU) is None and v2.runs == []


def test_auto_mode_falls_back_with_one_warning_and_kernel_mode_raises(tmp_path, hook):
    hook(make(tmp_path, BROKEN))
    t = [fake_cuda(), fake_cuda()]
    with pytest.warns(UserWarning) as record:
        assert _backend.use_kernel("bias_act", t) is False
        assert _backend.use_kernel("bias_act", t) is False
    assert len(record) == 1
    msg = str(record[0].message)
    assert "gptkernels.bias_act: using the PyTorch fallback (failed the self-test on Fake GPU" in msg
    assert "bias_act_fwd/bwd bf16" in msg and "y error" in msg
    assert _backend.use_kernel("layer_norm", t) is True  # passed its check
    with gptkernels.backend("kernel"), pytest.raises(ValueError, match="failed the self-test on Fake GPU"):
        _backend.use_kernel("bias_act", t)
    with gptkernels.backend("reference"):
        assert _backend.use_kernel("bias_act", t) is False


def test_fallback_choice_per_family(tmp_path, hook):
    """With one family's verdict failed, exactly that family's ops leave the kernel path."""
    for failed in FAMILIES:
        v = make(tmp_path / failed)
        bad = {"ok": False, "scope": "full", "case": "x", "problem": "y error 1 > bound 0.1"}
        v.cache.store(FAKE, {name: {**bad, "ok": name != failed} for name in FAMILIES})
        hook(v)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = {op: _backend.use_kernel(op, [fake_cuda()]) for op in OP_FAMILY}
        assert chosen == {op: fam != failed for op, fam in OP_FAMILY.items()}, failed
        assert v.runs == []


def test_every_op_that_asks_for_a_kernel_belongs_to_a_family():
    """Every op name passed to use_kernel in gptkernels/ is mapped to a family (else it would never
    be checked); every family's kernels exist in the extension's schema."""
    names = set()
    for path in (ROOT / "gptkernels").rglob("*.py"):
        names |= set(re.findall(r"use_kernel\(\s*\"(\w+)\"", path.read_text()))
    assert names and names <= set(OP_FAMILY), names - set(OP_FAMILY)
    if _backend.EXT_LOADED:
        for fam in FAMILIES.values():
            for k in fam.kernels:
                assert hasattr(torch.ops.gptkernels, k), k


# ---- cache keying and invalidation --------------------------------------------------------------

def test_identity_key_changes_with_every_field(monkeypatch):
    keys = {FAKE.key()}
    for field in ("gpu", "capability", "driver", "torch", "build"):
        keys.add(dataclasses.replace(FAKE, **{field: "other"}).key())
    assert len(keys) == 6
    monkeypatch.setattr(state, "CHECKS_VERSION", state.CHECKS_VERSION + 1)
    assert FAKE.key() not in keys


def test_cache_is_invalidated_when_the_identity_changes(tmp_path, monkeypatch):
    v = make(tmp_path, BROKEN)
    assert v.reason("bias_act", CPU) is not None
    for changed in (dataclasses.replace(FAKE, driver="560.1"), dataclasses.replace(FAKE, build="fedcba9876543210"),
                    dataclasses.replace(FAKE, torch="2.y (CUDA 13.0)")):
        fixed = make(tmp_path, None, identity=changed)  # a new driver / build / torch: checked again
        assert fixed.reason("bias_act", CPU) is None and fixed.runs == [("bias_act", changed.key())]
    assert len(list((tmp_path / "selftest").glob("*.json"))) == 4
    monkeypatch.setattr(state, "CHECKS_VERSION", state.CHECKS_VERSION + 1)  # new checks: old verdicts ignored
    assert v.cache.load(FAKE) == {}
    # a file whose identity does not match its key (copied, edited) is ignored
    path = v.cache.path(dataclasses.replace(FAKE, gpu="Other GPU"))
    path.write_text(json.dumps({"identity": dataclasses.asdict(FAKE), "checks_version": state.CHECKS_VERSION,
                                "families": {"bias_act": {"ok": False}}}))
    assert v.cache.load(dataclasses.replace(FAKE, gpu="Other GPU")) == {}


def test_default_cache_dir_and_unwritable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_CACHE", str(tmp_path / "c"))
    assert state.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GPTKERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert state.cache_dir() == tmp_path / "x" / "gptkernels"
    blocker = tmp_path / "file"
    blocker.write_text("")
    v = make(blocker, BROKEN)  # the cache folder is a file: verdicts live in the process only
    with pytest.warns(UserWarning, match="cannot write the cache"):
        assert v.reason("bias_act", CPU) is not None
    assert v.reason("bias_act", CPU) is not None and len(v.runs) == 1


def test_build_id_hashes_the_extension():
    if not _backend.EXT_LOADED:
        assert state.build_id() == "none"
        return
    bid = state.build_id()
    assert re.fullmatch(r"[0-9a-f]{16}", bid) and state.build_id() == bid


# ---- modes --------------------------------------------------------------------------------------

def test_mode_off_skips_checks_and_ignores_failed_verdicts(tmp_path):
    make(tmp_path, BROKEN).reason("bias_act", CPU)
    v = make(tmp_path, BROKEN, mode="off")
    assert v.reason("bias_act", CPU) is None and v.reason("mlp", CPU) is None and v.runs == []


def test_mode_force_reruns_once_per_process(tmp_path):
    make(tmp_path, BROKEN).reason("bias_act", CPU)  # cached: failed
    v = make(tmp_path, None, mode="force")  # the kernel was fixed
    assert v.reason("bias_act", CPU) is None and v.reason("bias_act", CPU) is None
    assert v.runs == [("bias_act", FAKE.key())]
    assert make(tmp_path).cache.load(FAKE)["bias_act"]["ok"] is True  # and the cache says so


def test_mode_from_environment_validated_at_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_SELFTEST", "sometimes")
    v = make(tmp_path, mode=None)  # constructing (importing) does not read it
    assert v.reason("no_such_op", CPU) is None  # ops outside every family never read it
    with pytest.raises(ValueError, match=r"^GPTKERNELS_SELFTEST: expected one of auto, off, force, got 'sometimes'$"):
        v.reason("bias_act", CPU)
    for value, mode in (("OFF", "off"), ("force", "force"), ("", "auto")):
        monkeypatch.setenv("GPTKERNELS_SELFTEST", value)
        v.reset()
        assert v.mode() == mode


def test_info_reports_a_bad_setting_instead_of_failing(monkeypatch, capsys):
    monkeypatch.setenv("GPTKERNELS_SELFTEST", "sometimes")
    monkeypatch.setattr(state.VERIFIER, "_mode", None)
    d = gptkernels.info()
    out = capsys.readouterr().out
    assert "GPTKERNELS_SELFTEST='sometimes', INVALID" in out and d["selftest"]["mode"] is None


def test_info_shows_the_state_per_family(tmp_path):
    v = make(tmp_path, BROKEN)
    v.reason("bias_act", CPU)
    v.reason("mlp", CPU)
    s = state.summary(CPU, v)
    assert s["gpu"] == "Fake GPU (sm_90)" and set(s["families"]) == set(FAMILIES)
    assert s["families"]["bias_act"].startswith("FAILED, disabled on this GPU: bias_act_fwd/bwd bf16")
    assert s["families"]["mlp"].startswith("passed (quick check")
    assert s["families"]["attention"].startswith("not checked yet")


# ---- when no check may run ------------------------------------------------------------------------

def test_no_recursion_while_a_check_runs(tmp_path):
    v = make(tmp_path)
    inner = []

    def reentrant(x, b, act):  # a kernel whose own path asks the verifier again
        inner.append(v.reason("bias_act", CPU))
        return torch.ops.gptkernels.bias_act_fwd(x, b, act)

    v.kernels = Ops(bias_act_fwd=reentrant)
    assert v.reason("bias_act", CPU) is None
    assert inner and all(r is None for r in inner) and len(v.runs) == 1


def test_no_check_while_compiling_or_capturing(tmp_path, monkeypatch):
    v = make(tmp_path, BROKEN)
    monkeypatch.setattr(state, "_capturing", lambda device: True)
    assert v.reason("bias_act", CPU) is None and v.runs == []  # unchecked, and not remembered
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert v.reason("bias_act", CPU) is None and v.runs == []
    monkeypatch.undo()
    assert v.reason("bias_act", CPU) is not None and len(v.runs) == 1  # the next eager call checks


def test_capture_uses_a_cached_verdict(tmp_path, monkeypatch):
    make(tmp_path, BROKEN).reason("bias_act", CPU)
    monkeypatch.setattr(state, "_capturing", lambda device: True)
    assert make(tmp_path).reason("bias_act", CPU) is not None


def test_compiled_code_uses_the_known_verdicts_and_never_checks(tmp_path):
    v = make(tmp_path, BROKEN)
    dev = torch.device("cuda", 0)
    v._resolved[("cuda", 0, "bias_act")] = "failed"  # resolved earlier in this process
    v._resolved[("cuda", 0, "mlp")] = None
    v.cache.store(FAKE, {"layer_norm": {"ok": False, "case": "c", "problem": "p"}})  # only in the cache

    def f(x):
        return (x + (1 if v.reason("bias_act", dev) is None else 2) + (10 if v.reason("mlp", dev) is None else 20)
                + (100 if v.reason("layer_norm", dev) is None else 200)
                + (1000 if v.reason("flash_attention", dev) is None else 2000))  # unknown: runs unchecked

    out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(2))
    assert out.tolist() == [1212.0, 1212.0] and v.runs == []
    assert v.reason("layer_norm", dev) == "failed the self-test on Fake GPU (sm_90): c: p"


def test_trace_time_lookup_is_what_assume_constant_result_marks():
    def g():
        return None

    torch.compiler.assume_constant_result(g)
    assert state._known_at_trace_time._dynamo_marked_constant is True
    assert [k for k in vars(g) if "dynamo" in k] == ["_dynamo_marked_constant"]


def test_out_of_memory_gives_no_verdict(tmp_path):
    def oom(*a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    v = make(tmp_path, Ops(bias_act_fwd=oom))
    with pytest.warns(UserWarning, match="no memory left to self-test the bias_act kernels"):
        assert v.reason("bias_act", CPU) is None
    assert v.cache.load(FAKE) == {} and v.reason("bias_act", CPU) is None


def test_a_check_that_breaks_disables_its_family_without_caching(tmp_path):
    def broken_check(k, device, quick=False):
        raise RuntimeError("no such table\nmore")

    fams = {**FAMILIES, "bias_act": dataclasses.replace(FAMILIES["bias_act"], check=broken_check)}
    v = state.Verifier(identity=lambda d: FAKE, cache=state.Cache(tmp_path), mode="auto", families=fams)
    why = v.reason("bias_act", CPU)
    assert why == "failed the self-test on Fake GPU (sm_90): the check: RuntimeError: no such table"
    assert v.cache.load(FAKE) == {} and v.reason("layer_norm", CPU) is None


def test_check_leaves_the_callers_state_alone(tmp_path):
    v = make(tmp_path)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert v.reason("mlp", CPU) is None and v.reason("flash_attention", CPU) is None
        assert torch.get_float32_matmul_precision() == "medium"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(False)
    assert torch.equal(torch.rand(3), expected)  # the global RNG did not move
    assert len(v.runs) == 2


# ---- the full run and the command line ---------------------------------------------------------------

def test_selftest_report_table_json_and_recorded_verdicts(tmp_path, capsys):
    v = make(tmp_path, BROKEN)
    report = selftest(["bias_act", "cross_entropy"], quick=True, device="cpu", json_path=tmp_path / "r.json",
                      verifier=v)
    assert report.status == "fail" and not report.ok
    out = capsys.readouterr().out
    assert re.search(r"bias_act\s+bias_act_fwd/bwd\s+2\s+\S+ / \S+\s+NO", out), out
    assert re.search(r"cross_entropy\s+cross_entropy_fwd \+ scale_grad_\s+2\s+\S+ / \S+\s+yes", out), out
    assert "FAILED bias_act: bias_act_fwd/bwd bf16" in out and "1 of 2 families FAILED (bias_act)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    env = data["environment"]
    assert (env["gpu"], env["capability"], env["driver"], env["build"]) == ("Fake GPU", "9.0", "550.54",
                                                                               "0123456789abcdef")
    assert env["torch"] and "extension_build_info" in env and env["identity_key"] == FAKE.key()
    assert data["status"] == "fail" and len(data["cases"]) == 4
    assert data["families"]["bias_act"]["ok"] is False
    assert v.cache.load(FAKE)["cross_entropy"]["scope"] == "quick"
    assert v.reason("bias_act", CPU) is not None and v.runs == []  # the run's verdicts apply at once


def test_a_full_run_replaces_the_verdicts_this_process_resolved(tmp_path):
    v = make(tmp_path)
    assert v.reason("bias_act", CPU) is None  # quick check passed
    v.kernels = BROKEN  # the same process later runs the full self-test, which fails
    selftest(["bias_act"], device="cpu", verifier=v, verbose=False)
    assert v.reason("bias_act", CPU).startswith("failed the self-test on Fake GPU")
    assert v.cache.load(FAKE)["bias_act"]["scope"] == "full"


def test_selftest_passes_with_working_kernels(tmp_path, capsys):
    v = make(tmp_path)
    report = selftest(["layer_norm"], device="cpu", verifier=v, record=False)
    assert report.ok and report.json_path and Path(report.json_path).is_file()
    assert "all 1 families passed" in capsys.readouterr().out
    assert v.cache.load(FAKE) == {}
    with pytest.raises(ValueError, match="families: unknown nope"):
        selftest(["nope"], device="cpu", verifier=v)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_no_cuda_device_one_line_exit_2(capsys):
    report = gptkernels.selftest()
    assert report.status == "unavailable" and not report.ok and "no CUDA device" in report.reason
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("gptkernels selftest: no CUDA device")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "gptkernels._selftest"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr == ""
    assert p.stdout.strip().count("\n") == 0 and "no CUDA device" in p.stdout


def test_cli_bad_arguments_are_one_line(capsys):
    from gptkernels._selftest import main
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert main(["--families", "nope"]) == 2
    assert capsys.readouterr().err.strip() == (f"gptkernels selftest: error: families: unknown nope (known: "
                                               f"{', '.join(FAMILIES)})")


@pytest.mark.cuda
def test_selftest_on_this_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_CACHE", str(tmp_path))
    report = selftest(quick=True, verifier=state.Verifier(cache=state.Cache(tmp_path)))
    assert report.ok, [f"{c.label()}: {c.problem()}" for c in report.failures()]
