"""`gptkernels selftest` / `gptkernels.selftest()`: every kernel family against its reference on the
current GPU, a table, a JSON report, and the verdicts stored as this GPU's verified state.

Exit codes of the command: 0 every family passed, 1 a family failed, 2 nothing to test (no CUDA
device, or the extension is not built) or bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from gptkernels import _backend
from gptkernels._selftest import state
from gptkernels._selftest.families import FAMILIES
from gptkernels._selftest.harness import CaseResult, clean_numerics

EXIT_PASS, EXIT_FAIL, EXIT_UNAVAILABLE = 0, 1, 2
DESCRIPTION = ("Check every kernel family against its reference on this GPU (both half dtypes, forward and "
               "backward): prints a table, writes a JSON report and stores the verdicts as this GPU's verified "
               "state. Exit codes: 0 every family passed, 1 a family failed, 2 nothing to test (no CUDA device) "
               "or bad arguments.")


@dataclasses.dataclass
class Report:
    """The result of a self-test run. `status`: "pass", "fail" or "unavailable" (then `reason` says why)."""
    status: str
    reason: str | None = None
    environment: dict = dataclasses.field(default_factory=dict)
    families: dict = dataclasses.field(default_factory=dict)  # name -> verdict (see state.verdict)
    cases: list = dataclasses.field(default_factory=list)  # CaseResult
    seconds: float = 0.0
    json_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def failures(self) -> list:
        return [c for c in self.cases if not c.ok]

    def rows(self) -> list:
        """One row per (family, implementation): (family, impl, cases, worst CaseResult, passed)."""
        groups: dict = {}
        for c in self.cases:
            groups.setdefault((c.family, c.impl), []).append(c)
        out = []
        for (fam, impl), cs in groups.items():
            bad = [c for c in cs if not c.ok]
            worst = bad[0] if bad else max(cs, key=lambda c: c.err / c.bound if c.bound else 0.0)
            out.append((fam, impl, len(cs), worst, not bad))
        return out

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "environment": self.environment,
                "families": self.families, "seconds": round(self.seconds, 3),
                "cases": [dataclasses.asdict(c) for c in self.cases]}


def environment(device, ident: state.Identity) -> dict:
    return {**dataclasses.asdict(ident), "device": str(device), "identity_key": ident.key(),
            "checks_version": state.CHECKS_VERSION,
            "extension_build_info": torch.ops.gptkernels.build_info() if _backend.EXT_LOADED else None,
            "python": platform.python_version()}


def unavailable_reason(device) -> str | None:
    if torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return (f"no CUDA device is visible (torch {torch.__version__}, "
                f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}); nothing to test")
    if not _backend.EXT_LOADED:
        return f"the CUDA extension gptkernels._C is not built ({_backend.EXT_ERROR}); nothing to test"
    return None


def selftest(families=None, quick: bool = False, device=None, json_path=None, file=None, verbose: bool = True,
             record: bool = True, kernels=None, identity=None, verifier: state.Verifier | None = None) -> Report:
    """Check every kernel family (or `families`, names from gptkernels._selftest.FAMILIES) on the
    current CUDA device against its reference; print a table (to `file`, default stdout, unless
    verbose=False), write the JSON report (to `json_path`, default <cache>/selftest/report-<key>.json)
    and store the verdicts as this GPU's verified state (unless record=False). quick: only the cases
    of the quick check. kernels / identity / verifier / a CPU device: injection points for tests."""
    file = file or sys.stdout
    names = list(FAMILIES) if families is None else list(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    device = torch.device(device if device is not None else "cuda")
    why = unavailable_reason(device)
    if why:
        if verbose:
            print(f"gptkernels selftest: {why}", file=file)
        return Report("unavailable", why)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    verifier = verifier or state.VERIFIER
    ident = (identity or verifier.identity)(device)
    report = Report("pass", environment=environment(device, ident))
    if verbose:
        print(f"gptkernels selftest on {ident.label()}: driver {ident.driver}, torch {ident.torch}, "
              f"build {ident.build} ({report.environment['extension_build_info']}); "
              f"{'quick' if quick else 'all'} cases", file=file, flush=True)
    t0 = time.perf_counter()
    by_family = {}
    for name in names:
        t1 = time.perf_counter()
        try:
            with clean_numerics():
                rs = FAMILIES[name].check(kernels or verifier.kernels or torch.ops.gptkernels, device, quick=quick)
        except torch.cuda.OutOfMemoryError as e:  # says nothing about the kernels: reported, not recorded
            rs = [CaseResult(name, "-", "-", False, error=f"out of memory: {str(e).splitlines()[0]}")]
        else:
            by_family[name] = rs
            report.families[name] = state.verdict(rs, "quick" if quick else "full")
        report.cases += rs
        if verbose:  # progress: a run that dies in a kernel still shows how far it got
            bad = sum(not r.ok for r in rs)
            print(f"  {name}: {len(rs)} cases in {time.perf_counter() - t1:.1f} s, "
                  f"{'all passed' if not bad else f'{bad} FAILED'}", file=file, flush=True)
    report.seconds = time.perf_counter() - t0
    if report.failures():
        report.status = "fail"
    if record:
        verifier.record(ident, by_family, "quick" if quick else "full")
    path = Path(json_path) if json_path else verifier.cache.path(ident).with_name(f"report-{ident.key()}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=1))
        report.json_path = str(path)
    except OSError as e:
        if verbose:
            print(f"gptkernels selftest: could not write the report {path}: {e}", file=file)
    if verbose:
        print_table(report, file)
    return report


def _worst(c: CaseResult) -> str:
    if c.error:
        return "error"
    return f"{c.err:.2e} / {c.bound:.2e}"


def print_table(report: Report, file=None) -> None:
    file = file or sys.stdout
    rows = report.rows()
    lines = [f"{'family':<21} {'implementation':<32} {'cases':>5}  {'worst error / bound':<21} pass"]
    for fam, impl, n, worst, passed in rows:
        lines.append(f"{fam:<21} {impl:<32} {n:>5}  {_worst(worst):<21} {'yes' if passed else 'NO'}")
    for c in report.failures():
        lines.append(f"FAILED {c.family}: {c.label()}: {c.problem()}")
    n_fam = len(report.families)
    bad = sorted({c.family for c in report.failures()})
    summary = (f"all {n_fam} families passed" if not bad else
               f"{len(bad)} of {len(set(c.family for c in report.cases))} families FAILED ({', '.join(bad)}): "
               "disabled on this GPU, their ops use the PyTorch path")
    lines.append(f"{summary} in {report.seconds:.1f} s" + (f"; report: {report.json_path}" if report.json_path else ""))
    print("\n".join(lines), file=file, flush=True)


# ---- command line -----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", help=f"comma-separated subset of: {', '.join(FAMILIES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="only the quick check's cases (what runs at first use)")
    p.add_argument("--json", metavar="PATH", help="write the JSON report here (default: in the gptkernels cache)")
    p.add_argument("--device", type=int, default=None, metavar="N", help="CUDA device index (default: current)")
    p.add_argument("--no-record", action="store_true", help="do not store the verdicts as this GPU's verified state")


def run_args(args) -> int:
    """Run the command for parsed arguments (see add_arguments); returns the exit code. A bad argument
    is one line on stderr and exit code 2 (1 means a family failed)."""
    try:
        families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if args.device is not None and n and not 0 <= args.device < n:
            raise ValueError(f"--device: expected an index below {n}, got {args.device}")
        device = "cuda" if args.device is None else f"cuda:{args.device}"
        report = selftest(families, quick=args.quick, device=device, json_path=args.json, record=not args.no_record)
    except ValueError as e:
        print(f"gptkernels selftest: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return {"pass": EXIT_PASS, "fail": EXIT_FAIL}.get(report.status, EXIT_UNAVAILABLE)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `selftest` subcommand to an argparse subparsers object (gptkernels.gpt.cli)."""
    p = sub.add_parser("selftest", help="check every kernel family against its reference on this GPU",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(fn=run_args)
    return p


def main(argv=None) -> int:
    """`gptkernels selftest [...]` as a standalone command (python -m gptkernels._selftest)."""
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(EXIT_UNAVAILABLE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    p = _Parser(prog="gptkernels selftest", description=DESCRIPTION)
    add_arguments(p)
    return run_args(p.parse_args(argv))
