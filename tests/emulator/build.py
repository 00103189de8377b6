"""build.py: build the CPU-emulated kernel libraries (one shared library per kernel family).

Steps: translate every csrc/**/*.{cu,cuh,h} into build/emu/src/ (translate.py), compile the family's
kernel files, its test-only C ABI (tests/emulator/abi_<family>.cpp) and the emulator runtime
(cuda_emu.cpp, cuda_emu_sm90.cpp) with g++ -std=c++20 under AddressSanitizer + UBSan, link
build/emu/lib/libgptk_emu_<family>-<hash>.so. Objects and libraries are cached by a hash of
everything that goes into them (sources, translated headers, emulator, flags, compiler), so a
second build is instant and an edited kernel rebuilds only its object.

The libraries must be loaded into a process that has the ASan runtime first (LD_PRELOAD, see
asan_env()); the harness (tests/emulator/harness.py) does that in a worker process.

    python tests/emulator/build.py [family ...]     # prints the library paths
"""
from __future__ import annotations

import concurrent.futures as cf
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _load(name: str, path: Path):
    """Import a sibling module under a unique name (a plain `import translate` could pick up an
    installed package of that name)."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


translate = _load("gptk_cuda_emu_translate", HERE / "translate.py")

# family -> (kernel files under csrc/ (glob patterns allowed), ABI file under tests/emulator/ or None).
# "selftest" is the emulator's own test kernels (tests/emulator/selftest/, translated into _selftest/).
FAMILIES = {
    "activation": (["activation/bias_act.cu"], "abi_activation.cpp"),
    "layernorm": (["layernorm/layer_norm.cu"], "abi_layernorm.cpp"),
    "loss": (["loss/cross_entropy.cu", "elementwise.cu"], "abi_loss.cpp"),
    # the per-(head dim, dtype) instantiation files, whatever head dims they are generated for
    "attention": (["attention/flash_api.cu", "attention/flash_bwd_prep.cu", "attention/flash_decode.cu",
                   "attention/flash_fwd_hdim*_*.cu", "attention/flash_bwd_hdim*_*.cu"], "abi_attention.cpp"),
    # the Hopper (sm_90a) forward and backward: their dispatch files and instantiations, driven directly by
    # their ABI (the backward with the sm_80 path's preprocess / convert kernels around it, as flash_bwd runs it)
    "attention_sm90": (["attention/sm90/flash_fwd_sm90_api.cu", "attention/sm90/flash_fwd_sm90_hdim*_*.cu",
                        "attention/sm90/flash_bwd_sm90_api.cu", "attention/sm90/flash_bwd_sm90_hdim*_*.cu",
                        "attention/flash_bwd_prep.cu"], "abi_attention_sm90.cpp"),
    "selftest": (["_selftest/*.cu"], None),
}


def family_files(family: str, reports: dict) -> list[str]:
    """The family's kernel files (relative to the translated tree) that exist, globs expanded
    (sorted); [] when a file it names is missing (the family's kernels are not in this tree)."""
    out = []
    for pat in FAMILIES[family][0]:
        if any(c in pat for c in "*?["):
            hits = sorted(k for k in reports if k.endswith(".cu") and fnmatch.fnmatchcase(k, pat))
            if not hits:
                return []
            out += hits
        elif pat in reports:
            out.append(pat)
        else:
            return []
    return out


# The emulator runtime (cuda_emu.cpp: fibers, scheduler, barriers, warp collectives, runtime API;
# cuda_emu_sm90.cpp: wgmma, mbarrier, TMA, named barriers, setmaxnreg, elect, stmatrix).
RUNTIME_SOURCES = [HERE / "cuda_emu.cpp", HERE / "cuda_emu_sm90.cpp"]

SANITIZE = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
# Kernel files compile at -O0 (4-5x faster to build than -O1 under the sanitizers, and the cases are
# small); the emulator runtime, where the time goes (fiber switches), at -O2. -g1: line tables for
# the sanitizers' stack traces.
CXXFLAGS = ["-std=c++20", "-g1", "-fPIC", "-fno-strict-aliasing", "-fno-omit-frame-pointer", *SANITIZE,
            "-DGPTK_EMU=1"]
KERNEL_OPT = os.environ.get("GPTK_EMU_OPT", "-O0")
RUNTIME_OPT = "-O2"


class BuildError(Exception):
    """kind: "environment" (no usable compiler/sanitizer: tests skip) or "compile" (our code does
    not build: tests fail)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Built:
    family: str
    lib: Path
    unsupported_ptx: list


def cxx() -> str:
    return os.environ.get("CXX", "g++")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


_probe_cache: dict = {}


def probe(build_dir: Path) -> str:
    """Checks that the compiler builds and the runtime loads an ASan+UBSan C++20 shared library
    (the environment); returns the compiler's version string. Raises BuildError("environment")."""
    key = cxx()
    if key in _probe_cache:
        return _probe_cache[key]
    if shutil.which(cxx()) is None:
        raise BuildError("environment", f"no C++ compiler ({cxx()!r} not found)")
    ver = _run([cxx(), "--version"]).stdout.splitlines()[0:1]
    ver = ver[0] if ver else cxx()
    d = build_dir / "probe"
    d.mkdir(parents=True, exist_ok=True)
    src = d / "probe.cpp"
    src.write_text('#include <atomic>\n#include <bit>\n#include <ucontext.h>\n'
                   'extern "C" int probe(float f) { std::atomic_ref<float> r(f); r.fetch_add(1.f);'
                   ' ucontext_t u; getcontext(&u); return std::bit_cast<int>(f) != 0; }\n')
    lib = d / "libprobe.so"
    r = _run([cxx(), "-std=c++20", "-shared", "-fPIC", *SANITIZE, str(src), "-o", str(lib)])
    if r.returncode != 0:
        raise BuildError("environment", f"{cxx()} cannot build C++20 with -fsanitize=address,undefined:\n"
                                        f"{r.stderr[-2000:]}")
    asan = asan_runtime()
    if asan is None:
        raise BuildError("environment", f"{cxx()} has no shared ASan runtime (libasan.so)")
    # The ASan runtime must also start under this Python with torch loaded (it cannot on some
    # kernels' address-space layouts, or with another preloaded sanitizer).
    code = f"import ctypes, torch; ctypes.CDLL({str(lib)!r}).probe(ctypes.c_float(1.0))"
    r = _run([sys.executable, "-c", code], env=asan_env())
    if r.returncode != 0:
        raise BuildError("environment", f"an ASan-instrumented library does not load into {sys.executable} with the "
                                        f"ASan runtime preloaded:\n{r.stderr[-2000:]}")
    _probe_cache[key] = ver
    return ver


def asan_runtime() -> str | None:
    r = _run([cxx(), "-print-file-name=libasan.so"])
    p = r.stdout.strip()
    return p if r.returncode == 0 and os.path.isabs(p) and os.path.exists(p) else None


def asan_env(base: dict | None = None) -> dict:
    """Environment for a process that loads the emulated libraries."""
    env = dict(os.environ if base is None else base)
    # libstdc++ right after the ASan runtime: ASan resolves its __cxa_throw interceptor when it
    # starts, and torch throws (and catches) C++ exceptions.
    preload = [asan_runtime() or ""]
    r = _run([cxx(), "-print-file-name=libstdc++.so.6"])
    if r.returncode == 0 and os.path.isabs(r.stdout.strip()):
        preload.append(r.stdout.strip())
    env["LD_PRELOAD"] = " ".join(p for p in preload if p)
    # Python and torch are not instrumented: no leak checking, no new/delete pairing checks there.
    env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:print_summary=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def translate_tree(csrc: Path, out: Path) -> dict:
    """Mirror csrc/ translated into out/; returns {relative path: report}. Files are rewritten only
    when their translation changes."""
    reports = {}
    for p in sorted(csrc.rglob("*")):
        if p.suffix not in (".cu", ".cuh", ".h") or not p.is_file():
            continue
        rel = p.relative_to(csrc)
        try:
            text, rep = translate.translate(p.read_text(), str(p.resolve()))
        except translate.TranslateError as e:
            raise BuildError("compile", f"translate.py: {e}") from None
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
        reports[str(rel)] = rep
    return reports


def build(families=None, root: Path = ROOT, build_dir: Path | None = None, jobs: int | None = None) -> dict:
    """Builds the families' libraries (all in FAMILIES whose kernel files exist, by default).
    Returns {family: Built}; a family whose kernel files are not in this tree is left out.
    Raises BuildError."""
    root = Path(root)
    build_dir = Path(build_dir or root / "build" / "emu")
    ver = probe(build_dir)
    csrc = root / "csrc"
    src_dir, obj_dir, lib_dir = build_dir / "src", build_dir / "obj", build_dir / "lib"
    for d in (obj_dir, lib_dir):
        d.mkdir(parents=True, exist_ok=True)
    reports = translate_tree(csrc, src_dir)
    reports.update({f"_selftest/{k}": v for k, v in translate_tree(HERE / "selftest", src_dir / "_selftest").items()})
    header = (HERE / "cuda_emu.h").read_text()
    shims = "".join(p.read_text() for p in sorted((HERE / "include").glob("*.h")))
    headers = "".join(f"{k}\n{(src_dir / k).read_text()}" for k in sorted(reports) if not k.endswith(".cu"))
    flags = CXXFLAGS + ["-include", str(HERE / "cuda_emu.h"), "-I", str(HERE / "include"), "-I", str(src_dir)]
    common = _hash(ver, flags, KERNEL_OPT, RUNTIME_OPT, header, shims, headers)

    wanted = list(FAMILIES) if families is None else list(families)
    for f in wanted:
        if f not in FAMILIES:
            raise BuildError("compile", f"unknown family {f!r} (known: {', '.join(FAMILIES)})")
    files = {f: family_files(f, reports) for f in wanted}
    present = [f for f in wanted if files[f]]

    # compile jobs: (object path, source path, is .cu)
    jobs_list = {}
    internal = (HERE / "cuda_emu_internal.h").read_text()
    rt_objs = []
    for rt_src in RUNTIME_SOURCES:
        rt_obj = obj_dir / f"{rt_src.stem}-{_hash(common, internal, rt_src.read_text())}.o"
        jobs_list[rt_obj] = (rt_src, False, RUNTIME_OPT)
        rt_objs.append(rt_obj)
    fam_objs = {}
    for f in present:
        abi = FAMILIES[f][1]
        objs = list(rt_objs)
        for k in files[f]:
            src = src_dir / k
            o = obj_dir / f"{Path(k).stem}-{_hash(common, k, src.read_text())}.o"
            jobs_list[o] = (src, True, KERNEL_OPT)
            objs.append(o)
        if abi is not None:
            abi_src = HERE / abi
            o = obj_dir / f"{Path(abi).stem}-{_hash(common, (HERE / 'abi.h').read_text(), abi_src.read_text())}.o"
            jobs_list[o] = (abi_src, False, KERNEL_OPT)
            objs.append(o)
        fam_objs[f] = objs

    def compile_one(item):
        obj, (src, is_cu, opt) = item
        if obj.exists():
            return None
        tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
        cmd = [cxx(), opt, *flags, *(["-x", "c++"] if is_cu else []), "-c", str(src), "-o", str(tmp)]
        r = _run(cmd)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            return f"{src}:\n{r.stderr[-6000:]}"
        os.replace(tmp, obj)
        return None

    n = jobs or int(os.environ.get("GPTK_EMU_JOBS", "0")) or min(4, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(max_workers=n) as ex:
        errors = [e for e in ex.map(compile_one, jobs_list.items()) if e]
    if errors:
        raise BuildError("compile", "compile errors in the emulated build:\n" + "\n".join(errors))

    out = {}
    for f in present:
        objs = fam_objs[f]
        lib = lib_dir / f"libgptk_emu_{f}-{_hash(*[o.name for o in objs])}.so"
        if not lib.exists():
            tmp = lib.with_suffix(f".tmp{os.getpid()}.so")
            r = _run([cxx(), "-shared", *SANITIZE, *[str(o) for o in objs], "-o", str(tmp)])
            if r.returncode != 0:
                raise BuildError("compile", f"link of {lib.name} failed:\n{r.stderr[-4000:]}")
            os.replace(tmp, lib)
        # (headers' inline PTX is listed for every family: which headers a file includes is not tracked)
        unsupported = [u for k, rep in reports.items()
                       if k in files[f] or (not k.endswith(".cu") and not k.startswith("_selftest"))
                       for u in rep.unsupported_ptx]
        out[f] = Built(f, lib, unsupported)
    return out


def main(argv):
    try:
        built = build(argv[1:] or None)
    except BuildError as e:
        print(f"build failed ({e.kind}): {e}", file=sys.stderr)
        return 1
    for b in built.values():
        print(f"{b.family}: {b.lib}")
        for u in b.unsupported_ptx:
            print(f"  inline PTX not emulated: {u}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
