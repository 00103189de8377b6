"""Build gptkernels: the Python package plus, when it can, the CUDA extension `gptkernels._C`.

The extension is built when nvcc and a CUDA-enabled torch are both present. Otherwise the
pure-Python package installs (every op then runs its PyTorch reference) and we say so.

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
    gencode = []
    for a in archs:
        gencode.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
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
    defines = [f'-DGPTK_CUDA_ARCHS="{";".join(archs)}"', f'-DGPTK_CUDA_VERSION="{torch.version.cuda}"']
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
    say(f"building the CUDA extension gptkernels._C for sm_{', sm_'.join(archs)} "
        f"(CUDA_HOME={cuda_home}, {len(sources)} sources, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    return [ext], None


ext_modules, why_not = extension_modules()
cmdclass = {}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
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
