"""The verified state: which kernel families passed their check on this GPU with this build.

Results are cached per GPU identity (GPU name, compute capability, driver, torch version, a hash of
the extension binary, and CHECKS_VERSION) in one JSON file per identity under
<cache>/selftest/<key>.json, <cache> = $GPTKERNELS_CACHE or $XDG_CACHE_HOME/gptkernels or
~/.cache/gptkernels. Any change of identity is a new key: nothing is reused across GPUs, drivers,
torch versions or rebuilds.

GPTKERNELS_SELFTEST (read at the first kernel call, not at import):
  auto  (default) the first kernel call of a family on a GPU without a cached result runs the
        family's quick check (about a second) and caches the verdict;
  off   no checks, no cached verdicts consulted: every family runs its kernels;
  force each family's quick check runs again at its first call in this process (the cache is updated).
A family that failed is disabled on that GPU: gptkernels._backend treats its calls as unsupported
(with the reason: the case and the error), so "auto" falls back to the PyTorch path with a warning
and "kernel" raises. Under torch.compile tracing or CUDA-graph capture no check runs: the cached
verdict applies if there is one, else the kernels run unchecked.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from gptkernels import _backend
from gptkernels._selftest.families import FAMILIES, OP_FAMILY
from gptkernels._selftest.harness import clean_numerics, one_line

MODES = ("auto", "off", "force")
ENV = "GPTKERNELS_SELFTEST"
CHECKS_VERSION = 1  # bump when the checks change: cached verdicts of older checks are then ignored


def read_mode(value: str | None = None) -> str:
    """The self-test mode from GPTKERNELS_SELFTEST (or `value`); a clear one-line error if invalid."""
    mode = os.environ.get(ENV, "auto") if value is None else value
    mode = mode.strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


def cache_dir() -> Path:
    """gptkernels' cache folder (self-test verdicts, datasets, benchmark output): $GPTKERNELS_CACHE, else
    $XDG_CACHE_HOME/gptkernels, else ~/.cache/gptkernels. A GPTKERNELS_CACHE that names a file is an
    error naming the variable."""
    env = os.environ.get("GPTKERNELS_CACHE", "").strip()
    if env:
        if os.path.exists(env) and not os.path.isdir(env):
            raise ValueError(f"GPTKERNELS_CACHE: expected a folder, found a file ({env})")
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "gptkernels"


# ---- identity ---------------------------------------------------------------------------------

_build_ids: dict = {}


def build_id() -> str:
    """sha256 (16 hex digits) of the extension binary: any rebuild is a new build. Hashed once per
    process (about 0.2 s for the ~30 MB binary); "none" without the extension."""
    path = getattr(_backend._C, "__file__", None)
    if not path:
        return "none"
    st = os.stat(path)
    stamp = (path, st.st_size, st.st_mtime_ns)
    if stamp not in _build_ids:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _build_ids[stamp] = h.hexdigest()[:16]
    return _build_ids[stamp]


def driver_version() -> str:
    """The NVIDIA driver version (from /proc on Linux), else "unknown"."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for word in f.readline().split():
                if word[:1].isdigit() and "." in word:
                    return word
    except OSError:
        pass
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Identity:
    gpu: str
    capability: str
    driver: str
    torch: str
    build: str

    def key(self) -> str:
        text = json.dumps([dataclasses.astuple(self), CHECKS_VERSION])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.gpu} (sm_{self.capability.replace('.', '')})"


def gpu_identity(device) -> Identity:
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    major, minor = torch.cuda.get_device_capability(idx)
    return Identity(torch.cuda.get_device_name(idx), f"{major}.{minor}", driver_version(),
                    f"{torch.__version__} (CUDA {torch.version.cuda})", build_id())


# ---- cache ------------------------------------------------------------------------------------

class Cache:
    """One JSON file per identity: {"identity": {...}, "families": {name: verdict}}. Writes are atomic
    (several processes, e.g. the ranks of a job, may write at once: the last complete file wins, and
    a verdict lost that way is checked again later). A cache that cannot be written warns once."""

    def __init__(self, root: Path | None = None):
        self.root = root
        self._warned = False

    def path(self, ident: Identity) -> Path:
        return (self.root or cache_dir()) / "selftest" / f"{ident.key()}.json"

    def load(self, ident: Identity) -> dict:
        try:
            data = json.loads(self.path(ident).read_text())
        except (OSError, ValueError):
            return {}
        if data.get("identity") != dataclasses.asdict(ident) or data.get("checks_version") != CHECKS_VERSION:
            return {}
        fams = data.get("families")
        return fams if isinstance(fams, dict) else {}

    def store(self, ident: Identity, verdicts: dict) -> Path | None:
        path = self.path(ident)
        data = {"identity": dataclasses.asdict(ident), "checks_version": CHECKS_VERSION,
                "families": {**self.load(ident), **verdicts}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
            return path
        except OSError as e:
            if not self._warned:
                self._warned = True
                warnings.warn(f"gptkernels self-test: cannot write the cache {path} ({e}); verdicts are kept for "
                              "this process only", stacklevel=3)
            return None


def verdict(results, scope: str) -> dict:
    """A family's cached verdict from its case results: ok, and the worst case (the first failure,
    else the largest error / bound)."""
    if not results:
        raise ValueError("a family's check returned no case")
    bad = [r for r in results if not r.ok]
    ratio = lambda r: (r.err / r.bound) if r.bound else 0.0  # noqa: E731
    worst = bad[0] if bad else max(results, key=ratio)
    return {"ok": not bad, "scope": scope, "cases": len(results), "failed": len(bad), "case": worst.label(),
            "problem": worst.problem(), "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def failure_reason(ident: Identity, v: dict) -> str:
    return f"failed the self-test on {ident.label()}: {v['case']}: {v['problem']}"


# ---- the verifier (gptkernels._backend's hook) -----------------------------------------------

class Verifier:
    """Answers, per call, whether a family's kernels may run on a device. Everything it depends on is
    injectable for tests: the identity of a device, the kernels namespace, the cache, the mode."""

    def __init__(self, identity=gpu_identity, kernels=None, cache: Cache | None = None, mode: str | None = None,
                 families=None):
        self.identity = identity
        self.kernels = kernels
        self.cache = cache or Cache()
        self.families = families or FAMILIES
        self.op_family = {op: f.name for f in self.families.values() for op in f.ops} if families else OP_FAMILY
        self._mode = mode
        self._resolved: dict = {}  # (device type, index, family) -> None (may run) or the reason it may not
        self._lock = threading.RLock()
        self._local = threading.local()
        self.runs: list = []  # (family, identity key) of every quick check run by this verifier

    def mode(self) -> str:
        if self._mode is None:
            self._mode = read_mode()
        return self._mode

    def reset(self, mode: str | None = None) -> None:
        """Forget this process's verdicts (and the mode, re-read from the environment unless given)."""
        with self._lock:
            self._resolved.clear()
            self._mode = mode

    def reason(self, op: str, device) -> str | None:
        """None when `op`'s kernels may run on `device`, else why not (its family failed). Runs the
        family's quick check at its first call when there is no cached verdict (mode auto/force).
        Traced by torch.compile: only the lookup of verdicts this process already resolved."""
        family = self.op_family.get(op)
        if family is None:
            return None
        if not isinstance(device, torch.device):
            device = torch.device(device)
        slot = (device.type, device.index, family)
        known = self._resolved.get(slot, _UNSET)
        if known is not _UNSET:
            return known
        if torch.compiler.is_compiling():  # a constant of the traced graph: the cached verdict, no check
            return _known_at_trace_time(self, family, device.type, device.index)
        return self._resolve(slot, family, device)

    def known(self, family: str, device, remember: bool = True) -> str | None:
        """The reason `family` may not run on `device` from the verdicts known without a check (this
        process's, else the cache's); None if it passed or has no verdict (or the mode is off).
        remember: keep a verdict read from the cache for the next calls (not while tracing: the
        traced code's guards watch that dict)."""
        slot = (device.type, device.index, family)
        if slot in self._resolved:
            return self._resolved[slot]
        mode = self.mode()
        if mode == "off":
            why = None
        else:
            ident = self.identity(device)
            v = None if mode == "force" else self.cache.load(ident).get(family)
            if v is None:
                return None
            why = None if v.get("ok") else failure_reason(ident, v)
        if remember:
            self._resolved[slot] = why
        return why

    def _resolve(self, slot, family: str, device) -> str | None:
        if getattr(self._local, "busy", False):  # a check is running: its own kernel calls pass
            return None
        with self._lock:
            why = self.known(family, device)
            if slot in self._resolved or _capturing(device):
                return why  # known, or unknown while capturing a CUDA graph: the next eager call checks
            ident = self.identity(device)
            v = self._check(family, device, ident)
            if v is None:  # out of memory: no verdict; the kernels run unchecked in this process
                self._resolved[slot] = None
                return None
            self._resolved[slot] = None if v.get("ok") else failure_reason(ident, v)
            return self._resolved[slot]

    def _check(self, family: str, device, ident: Identity) -> dict | None:
        self._local.busy = True
        try:
            with clean_numerics():
                results = self.families[family].check(self.kernels or torch.ops.gptkernels, torch.device(device),
                                                       quick=True)
            v = verdict(results, "quick")
        except torch.cuda.OutOfMemoryError:
            warnings.warn(f"gptkernels: no memory left to self-test the {family} kernels on {ident.label()}; "
                          "they run unchecked in this process", stacklevel=5)
            return None
        except Exception as e:  # the check itself broke (not one of its cases): not cached, but not trusted
            return {"ok": False, "scope": "quick", "case": "the check", "problem": one_line(e)}
        finally:
            self._local.busy = False
        self.runs.append((family, ident.key()))
        self.cache.store(ident, {family: v})
        return v

    def record(self, ident: Identity, results_by_family: dict, scope: str = "full") -> Path | None:
        """Store the verdicts of a full self-test run and apply them in this process."""
        verdicts = {name: verdict(rs, scope) for name, rs in results_by_family.items() if rs}
        with self._lock:
            for slot in [s for s in self._resolved if s[-1] in verdicts]:
                del self._resolved[slot]
        return self.cache.store(ident, verdicts)

    def states(self, device) -> dict:
        """family -> its cached verdict on `device` (None: not checked yet), for `gptkernels info`."""
        cached = self.cache.load(self.identity(device))
        return {name: cached.get(name) for name in self.families}


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _known_at_trace_time(verifier: Verifier, family: str, device_type: str, index) -> str | None:
    """Verifier.known, run by torch.compile while tracing and its result kept as a constant."""
    return verifier.known(family, torch.device(device_type, index), remember=False)


# What torch.compiler.assume_constant_result does (tests/test_selftest.py checks that it still is),
# without importing torch._dynamo (2 s) when gptkernels is imported.
_known_at_trace_time._dynamo_marked_constant = True


_UNSET = object()


VERIFIER = Verifier()


def summary(device=None, verifier: Verifier | None = None) -> dict:
    """The self-test state for `gptkernels info`: {"mode", "gpu", "families": {name: text}, "lines"}."""
    verifier = verifier or VERIFIER
    try:
        mode = shown = verifier.mode()
    except ValueError:
        mode = None
        shown = f"{os.environ.get(ENV)!r}, INVALID: expected {', '.join(MODES)}; the first kernel call raises"
    out = {"mode": mode, "gpu": None, "families": {}}
    if device is None and not (torch.cuda.is_available() and _backend.EXT_LOADED):
        why = "no CUDA device" if not torch.cuda.is_available() else "the extension is not built"
        out["lines"] = [f"self-test (GPTKERNELS_SELFTEST={shown}): nothing to check ({why})"]
        return out
    device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
    ident = verifier.identity(device)
    out["gpu"] = ident.label()
    try:
        states = verifier.states(device)
    except ValueError as e:  # e.g. a GPTKERNELS_CACHE that names a file: info still runs
        out["lines"] = [f"self-test (GPTKERNELS_SELFTEST={shown}): state unreadable: {e}"]
        return out
    for name, v in states.items():
        if v is None:
            text = "not checked yet (its quick check runs at its first kernel call)"
        elif v.get("ok"):
            text = f"passed ({'full self-test' if v.get('scope') == 'full' else 'quick check'}, {v.get('time')})"
        else:
            text = f"FAILED, disabled on this GPU: {v.get('case')}: {v.get('problem')}"
        out["families"][name] = text + (" [ignored: GPTKERNELS_SELFTEST=off]" if mode == "off" and v else "")
    out["lines"] = [f"self-test on {ident.label()} (GPTKERNELS_SELFTEST={shown}; cache {verifier.cache.path(ident)}):"]
    out["lines"] += [f"  {name:<28} {text}" for name, text in out["families"].items()]
    return out
