"""Build gptkernels: the Python package plus, when it can, the CUDA extension `gptkernels._C`.

The extension is built when nvcc and a CUDA-enabled torch are both present. Otherwise the
pure-Python package installs (every op then runs its PyTorch reference) and we say so.

Per-arch source sets: files under a folder named sm90/ (csrc/**/sm90/*.cu: wgmma, TMA) compile for
sm_90a only, and only when 90a is in the arch list (every file then sees -DGPTK_HAVE_SM90=1); every
other file compiles for every arch in the list, plus PTX for the newest one (compute_90 for
"80;90a"), so that a newer GPU JIT-compiles it instead of failing with "no kernel image".
CMakeLists.txt and tools/ptxas_report.py follow the same rule (arch_sets below).

Environment:
  GPTKERNELS_CUDA_ARCHS   "80;90a" style list (default: the visible GPU, else "80;90a")
  GPTKERNELS_NO_EXT=1     skip the extension
  GPTKERNELS_REQUIRE_EXT=1  fail the install if the extension cannot be built (CI sets it)
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja build)
  CUDA_HOME               CUDA root; found automatically when unset (see find_cuda_home)

Install with `pip install --no-build-isolation -e .`: build isolation would download and
build against a second copy of torch, which may not match the one you run with.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg):
    print(f"[gptkernels setup] {msg}", file=sys.stderr, flush=True)


def _is_cuda_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """CUDA root that has bin/nvcc and include/cuda_runtime.h.

    `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one),
    from which torch would guess the root /usr/local and fail to link -lcudart. So we ask nvcc
    itself: `nvcc --dryrun` prints the real toolkit root as `TOP=...`.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_cuda_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m and _is_cuda_root(os.path.realpath(m.group(1))):
                return os.path.realpath(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_cuda_root(guess):
            return guess
    if _is_cuda_root("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def cuda_archs():
    """List like ["80", "90a"] from GPTKERNELS_CUDA_ARCHS, else the visible GPU, else 80;90a."""
    env = os.environ.get("GPTKERNELS_CUDA_ARCHS", "").strip()
    if env:
        archs = [a.strip() for a in re.split(r"[;, ]+", env) if a.strip()]
        for a in archs:
            if not re.fullmatch(r"\d{2,3}a?", a):
                raise SystemExit(f"GPTKERNELS_CUDA_ARCHS: bad entry {a!r}; expected e.g. '80;90a'")
        return archs
    import torch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}"
        return [arch + "a" if major == 9 else arch]  # wgmma/TMA need the arch-specific 90a target
    return ["80", "90a"]


def arch_sets(sources, archs):
    """(general sources, sm90 sources, general nvcc -gencode flags, sm90 flags, PTX arch).
    sm90 sources are those under a folder named sm90; they are built only when 90a is in `archs`."""
    sm90 = [s for s in sources if "sm90" in os.path.normpath(s).split(os.sep)[:-1]]
    general = [s for s in sources if s not in sm90]
    ptx = str(max(int(a.rstrip("a")) for a in archs))
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    if "90a" not in archs:
        return general, [], gencode, [], ptx
    return general, sm90, gencode, ["-gencode=arch=compute_90a,code=sm_90a"], ptx


def nvcc_lib_dirs():
    """Directories with cuBLASLt (torch's CUDA wheels ship it in nvidia/cu*/lib or nvidia/cublas/lib)."""
    import importlib.util
    dirs, incs = [], []
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            for sub in sorted(glob.glob(os.path.join(base, "*"))):
                if glob.glob(os.path.join(sub, "lib", "libcublasLt.so*")):
                    dirs.append(os.path.join(sub, "lib"))
                    incs.append(os.path.join(sub, "include"))
    return dirs, incs


def extension_modules():
    if os.environ.get("GPTKERNELS_NO_EXT") == "1":
        return [], "GPTKERNELS_NO_EXT=1"
    try:
        import torch
    except ImportError:
        return [], "torch is not installed (install torch first, then this package with --no-build-isolation)"
    if torch.version.cuda is None:
        return [], f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return [], "nvcc (the CUDA compiler) was not found"
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import time
    from torch.utils.cpp_extension import CUDAExtension

    archs = cuda_archs()
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    sources, sm90_sources, gencode, sm90_flags, ptx = arch_sets(sources, archs)
    lib_dirs, inc_dirs = nvcc_lib_dirs()
    cublaslt = []
    for d in lib_dirs:
        libs = sorted(glob.glob(os.path.join(d, "libcublasLt.so*")))
        if libs:
            cublaslt = [f"-l:{os.path.basename(libs[0])}"]
            break
    if not cublaslt and glob.glob(os.path.join(cuda_home, "lib64", "libcublasLt.so")):
        cublaslt = ["-lcublasLt"]
        lib_dirs.append(os.path.join(cuda_home, "lib64"))
    if not cublaslt:
        return [], "cuBLASLt was not found (neither in torch's nvidia wheels nor in CUDA_HOME)"
    defines = [f'-DGPTK_CUDA_ARCHS="{";".join(archs)}"', f'-DGPTK_CUDA_PTX="{ptx}"',
               f'-DGPTK_CUDA_VERSION="{torch.version.cuda}"'] + (["-DGPTK_HAVE_SM90=1"] if "90a" in archs else [])
    ext = CUDAExtension(
        name="gptkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + inc_dirs,
        library_dirs=lib_dirs,
        runtime_library_dirs=lib_dirs,
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"] + gencode + defines,
        },
        extra_link_args=cublaslt,
        py_limited_api=False,
    )
    # Built by BuildWithArchSets (torch's build gives every .cu file the same -gencode flags).
    ext.gptk_sm90 = {"sources": sm90_sources, "flags": sm90_flags + defines, "nvcc": os.path.join(cuda_home, "bin", "nvcc")}
    say(f"building the CUDA extension gptkernels._C for sm_{', sm_'.join(archs)} + PTX compute_{ptx} "
        f"(CUDA_HOME={cuda_home}, {len(sources)} sources + {len(sm90_sources)} for sm_90a only, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    return [ext], None


def sm90_build_ext(base):
    """torch's BuildExtension, plus the sm90 source set compiled for sm_90a only (arch_sets) into
    objects linked into the extension."""

    class BuildWithArchSets(base):
        def build_extensions(self):
            for ext in self.extensions:
                cfg = getattr(ext, "gptk_sm90", None)
                if cfg and cfg["sources"]:
                    ext.extra_objects = list(ext.extra_objects or []) + self._compile_sm90(cfg)
            super().build_extensions()

        def _compile_sm90(self, cfg):
            from concurrent.futures import ThreadPoolExecutor
            from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
            headers = [p for ext in ("h", "cuh") for p in glob.glob(f"csrc/**/*.{ext}", recursive=True)]
            newest_header = max((os.path.getmtime(h) for h in headers), default=0)
            jobs = []
            for src in cfg["sources"]:
                obj = os.path.join(self.build_temp, "sm90", os.path.splitext(src)[0] + ".o")
                if not os.path.exists(obj) or os.path.getmtime(obj) < max(os.path.getmtime(src), newest_header):
                    os.makedirs(os.path.dirname(obj), exist_ok=True)
                    jobs.append([cfg["nvcc"], "-c", src, "-o", obj, "-std=c++17", "-O3", "-lineinfo",
                                 "-Xptxas=-warn-spills", "-Xcompiler", "-fPIC", f"-I{os.path.join(ROOT, 'csrc')}",
                                 *COMMON_NVCC_FLAGS, *cfg["flags"]])
            say(f"compiling {len(jobs)} of {len(cfg['sources'])} sm90 sources for sm_90a")
            with ThreadPoolExecutor(int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)) as ex:
                for cmd, p in zip(jobs, ex.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs)):
                    if p.returncode != 0:
                        raise SystemExit(f"[gptkernels setup] {' '.join(cmd)}\n{p.stdout}{p.stderr}")
            return [os.path.join(self.build_temp, "sm90", os.path.splitext(src)[0] + ".o") for src in cfg["sources"]]

    return BuildWithArchSets


ext_modules, why_not = extension_modules()
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = sm90_build_ext(BuildExtension).with_options(use_ninja=True)
else:
    if os.environ.get("GPTKERNELS_REQUIRE_EXT") == "1":
        raise SystemExit(f"[gptkernels setup] GPTKERNELS_REQUIRE_EXT=1 but the CUDA extension cannot be built: {why_not}")
    say("*" * 72)
    say(f"NOT building the CUDA extension: {why_not}.")
    say("Installing the pure-Python package: every op runs its PyTorch reference path.")
    say("*" * 72)

setup(
    # benchmarks/ ships beside the package, so `gptkernels bench` works from an installed wheel too
    packages=find_packages(include=["gptkernels", "gptkernels.*", "benchmarks"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
