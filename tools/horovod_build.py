"""How bootstrap.sh builds Horovod 0.28.1: the patches, the build environment, NCCL, CUDA, the wheel's cache key.

A build tool beside bootstrap.sh, not part of the installed package. bootstrap.sh runs ``python -m
tools.horovod_build COMMAND`` from the repository root with the interpreter that will hold the environment, often
before anything is installed in it, so this module uses the standard library only. The functions that decide
(which patches, which variables, which compute capabilities, which key) take what was probed as plain values and
return plain values; the ``probe_*`` functions run the tools. What the build takes from outside (tools on the
PATH, the packages a venv lacks, the offline directory) is in ``tools/build_inputs.py``. Every refusal is a
``BuildError`` whose message is one line naming the culprit, printed by the command line as exit status 1.

Two ways to get PyTorch (``LARSCALE_TORCH``):

* ``pin`` (default): the CPU torch pinned in constraints.txt, installed into a fresh venv. Horovod is built for
  PyTorch and TensorFlow with the MPI and Gloo controllers, as it always was.
* ``system``: the torch that ``PYTHON`` already imports (a site module, a container image, a CUDA build). The venv
  sees that interpreter's packages and nothing is installed over them; Horovod is built for PyTorch only
  (TensorFlow only with ``HOROVOD_WITH_TENSORFLOW=1``), with Gloo, and with MPI when ``mpicc`` is on the PATH.

``HOROVOD_GPU_OPERATIONS=NCCL`` asks for the NCCL build; it needs ``system`` (the pinned torch has no CUDA), a
CUDA torch and nvcc. NCCL comes from ``HOROVOD_NCCL_HOME``/``_INCLUDE``/``_LIB`` when set, else from the
``nvidia-nccl-*`` wheel that CUDA torch wheels depend on (the one NCCL torch itself loads), else from the system
(/usr or the CUDA toolkit). Any ``HOROVOD_*`` variable already in the environment wins over what is derived here.

Commands (``python -m tools.horovod_build --help``): ``check`` (refuse a bad request, or missing build tools,
before anything is built), ``plan`` (the build's variables as ``export`` lines and the wheel's cache key), ``patch
SRC`` (patch an unpacked sdist), ``verify`` (does the installed Horovod have what was asked), ``link-site VENV``
(let a venv see PYTHON's packages), ``missing SETUP_CFG`` (what a system-mode venv lacks), ``offline-check DIR``
and ``prepare-offline DIR``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.build_inputs import (
    HOROVOD_VERSION,
    BuildError,
    caps_from_arch_list,
    check_cc_list,
    check_offline_dir,
    declared_requirements,
    distribution_version,
    missing_distributions,
    missing_prerequisites,
    own_site_dirs,
    parse_cmake_version,
    parse_compute_caps,
    parse_gcc_major,
    parse_nvcc_release,
    prepare_offline,
    prerequisites_message,
    site_link_text,
)
from tools.horovod_installed import installed_summary, verify_installed

TORCH_MODES = ("pin", "system")
GPU_OPERATIONS = ("NCCL",)
# GCC 13 no longer includes <string>, <cstdint>, ... transitively; Horovod's sources and third_party/gloo relied on it.
GCC13_FORCED_INCLUDES = "-include string -include cstdint -include stdexcept -include limits"
NCCL_LINK_NAME = "libnccl.so"
NCCL_SONAME = "libnccl.so.2"


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------- patches


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` by ``new`` in one file of the unpacked sdist. ``new`` marks the patched state: a file that
    holds it is left alone; a file that holds neither (or ``old`` more than once) means the sdist is not the one
    these patches were written for, and the build stops there."""

    path: str
    old: str
    new: str
    why: str

    def apply(self, root: Path) -> str:
        """Patch the file under ``root``; returns "applied" or "already applied"; raises BuildError otherwise."""
        target = root / self.path
        if not target.is_file():
            raise BuildError(f"patch ({self.why}): {target} does not exist; is {root} Horovod {HOROVOD_VERSION}?")
        text = target.read_text()
        if self.new in text:
            return "already applied"
        count = text.count(self.old)
        if count != 1:
            first_line = self.old.splitlines()[0]
            raise BuildError(f"patch ({self.why}): {target} holds {first_line!r} {count} times, expected once; "
                             f"the sdist is not Horovod {HOROVOD_VERSION} as these patches know it")
        target.write_text(text.replace(self.old, self.new))
        if self.new not in target.read_text():
            raise BuildError(f"patch ({self.why}): {target} does not hold the patched text after writing it")
        return "applied"


# torch >= 2.1 headers need C++17; the release asks for C++14 (fixed upstream after 0.28.1).
CXX17_TOP = Patch("CMakeLists.txt", "set(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)",
                  "set(CMAKE_CXX_STANDARD 17)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)", "C++17 for torch >= 2.1")
CXX17_TORCH = Patch("horovod/torch/CMakeLists.txt", "    set(CMAKE_CXX_STANDARD 14)\n",
                    "    set(CMAKE_CXX_STANDARD 17)\n", "C++17 for the PyTorch extension")
# TF 2.21 moved the XLA headers, so the optional XLA-op source no longer compiles; we never enable XLA ops.
NO_XLA_OPS = Patch("horovod/tensorflow/CMakeLists.txt",
                   'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n',
                   "# larscale: the XLA-op source is left out (TF 2.21 moved the XLA headers it includes)\n",
                   "no XLA ops for TF 2.21")
# nvcc must compile the CUDA kernels in the C++ standard of the rest (torch's headers need 17; the file says 11).
CUDA17 = Patch("horovod/common/ops/cuda/CMakeLists.txt", "set(CMAKE_CUDA_STANDARD 11)\n",
               "set(CMAKE_CUDA_STANDARD 17)\n", "C++17 for the CUDA kernels")
# GCC 13: group_table.h uses std::string and int32_t without including their headers.
GCC13_GROUP_TABLE = Patch("horovod/common/group_table.h",
                          "#include <mutex>\n#include <queue>\n#include <unordered_map>\n",
                          "#include <cstdint>\n#include <mutex>\n#include <queue>\n#include <string>\n"
                          "#include <unordered_map>\n", "GCC 13 includes")


# ---------------------------------------------------------------- what was probed


@dataclass(frozen=True)
class Toolchain:
    """The build tools on this machine."""

    cmake: str | None                 # path of cmake
    cmake_version: tuple[int, ...]    # () when unknown
    cxx: str | None                   # path of the C++ compiler
    gcc_major: int | None             # None when the compiler is not GCC
    make: str | None
    mpicc: str | None
    ninja: str | None = None          # used by CMake when there is no make


@dataclass(frozen=True)
class Cuda:
    """What the NCCL build needs to know about CUDA on this machine."""

    torch_cuda: str | None            # torch.version.cuda, None for a CPU torch
    nvcc: str | None                  # path of nvcc
    nvcc_release: str | None          # "13.0"
    gpu_caps: tuple[str, ...] = ()    # compute capabilities of the local GPUs, "90"
    torch_arch_caps: tuple[str, ...] = ()  # those torch was built for (used when no GPU is visible)
    site_dirs: tuple[Path, ...] = ()  # where to look for the nvidia-nccl-* wheel


@dataclass(frozen=True)
class Interpreter:
    """The Python that will hold the environment."""

    executable: str
    version: tuple[int, int]
    torch_version: str | None
    tensorflow_version: str | None
    cpus: int


@dataclass(frozen=True)
class Request:
    """What is asked for, from the mode and the environment."""

    mode: str                     # pin | system
    gpu_operations: str | None    # NCCL or None
    with_tensorflow: bool
    with_mpi: bool

    @property
    def features(self) -> tuple[str, ...]:
        """What the installed Horovod must have (names of ``verify``'s checks)."""
        names = ["torch", "gloo"]
        if self.with_tensorflow:
            names.append("tensorflow")
        if self.with_mpi:
            names.append("mpi")
        if self.gpu_operations == "NCCL":
            names.append("nccl")
        return tuple(names)


@dataclass
class BuildPlan:
    """The build: variables to export, patches, the wheel's cache key, and what was decided (log lines)."""

    env: dict[str, str]
    patches: tuple[Patch, ...]
    key: str
    notes: list[str] = field(default_factory=list)
    nccl_link: tuple[Path, Path] | None = None   # (link to create, the library it points at)

    def shell(self) -> str:
        lines = [f"export {name}={shlex.quote(value)}" for name, value in self.env.items()]
        return "\n".join([*lines, f"LARSCALE_WHEEL_KEY={shlex.quote(self.key)}"]) + "\n"


# ---------------------------------------------------------------- deciding (pure)


def make_request(mode: str, env: Mapping[str, str], mpicc: str | None) -> Request:
    """The request from the mode and HOROVOD_* variables; bad knobs raise BuildError."""
    if mode not in TORCH_MODES:
        raise BuildError(f"LARSCALE_TORCH={mode}: choose pin (the CPU torch of constraints.txt, the default) or "
                         "system (the torch that PYTHON already has)")
    gpu = env.get("HOROVOD_GPU_OPERATIONS", "").strip() or None
    if gpu is not None and gpu.upper() not in GPU_OPERATIONS:
        raise BuildError(f"HOROVOD_GPU_OPERATIONS={gpu}: bootstrap.sh builds NCCL only "
                         "(unset it for the CPU build)")
    gpu = gpu.upper() if gpu else None
    if gpu and mode == "pin":
        raise BuildError("HOROVOD_GPU_OPERATIONS=NCCL needs a CUDA PyTorch, and the pinned torch (constraints.txt) "
                         "is the CPU build: set LARSCALE_TORCH=system and PYTHON=<a python whose torch has CUDA>")
    if _truthy(env.get("HOROVOD_WITHOUT_MPI")):
        with_mpi = False
    elif _truthy(env.get("HOROVOD_WITH_MPI")):
        with_mpi = True
    else:  # pin: Open MPI comes with the Debian packages; system: build MPI in when the machine has it
        with_mpi = mode == "pin" or mpicc is not None
    if mode == "pin":
        with_tf = not _truthy(env.get("HOROVOD_WITHOUT_TENSORFLOW"))
    else:
        with_tf = _truthy(env.get("HOROVOD_WITH_TENSORFLOW"))
    return Request(mode, gpu, with_tf, with_mpi)


def check_request(request: Request, interp: Interpreter, cuda: Cuda) -> None:
    """Refuse what this interpreter cannot build, in one line, before anything is built: system mode without a
    torch, an NCCL request without a CUDA torch or without nvcc."""
    if request.mode == "system" and interp.torch_version is None:
        raise BuildError(f"LARSCALE_TORCH=system: {interp.executable} has no torch (set PYTHON to the python that "
                         "has the PyTorch to use)")
    if request.gpu_operations is None:
        return
    if cuda.torch_cuda is None:
        raise BuildError(f"HOROVOD_GPU_OPERATIONS=NCCL needs a CUDA PyTorch, but torch {interp.torch_version} of "
                         f"{interp.executable} is a CPU build: point PYTHON at a python whose torch has CUDA")
    if cuda.nvcc is None:
        raise BuildError("HOROVOD_GPU_OPERATIONS=NCCL needs the CUDA compiler, and there is no nvcc in "
                         "HOROVOD_CUDA_HOME, CUDA_HOME, CUDA_PATH, on the PATH or in /usr/local/cuda")


def find_wheel_nccl(site_dirs: Sequence[Path]) -> tuple[Path, Path] | None:
    """(include dir, libnccl.so.2) of an ``nvidia-nccl-*`` wheel under one of ``site_dirs``, or None.

    The wheel installs ``nvidia/<name>/lib/libnccl.so.2`` beside ``nvidia/<name>/include/nccl.h`` (``nccl`` for
    nvidia-nccl-cu12 and -cu13); the first site dir that has both wins, as on sys.path.
    """
    for site in site_dirs:
        for lib in sorted(Path(site).glob(f"nvidia/*/lib/{NCCL_SONAME}")):
            include = lib.parent.parent / "include"
            if (include / "nccl.h").is_file():
                return include, lib
    return None


def find_system_nccl(roots: Sequence[Path]) -> Path | None:
    """The first root with include/nccl.h and a libnccl.so under lib, lib64 or lib/x86_64-linux-gnu."""
    for root in roots:
        if not (root / "include" / "nccl.h").is_file():
            continue
        for libdir in ("lib", "lib64", "lib/x86_64-linux-gnu"):
            if any((root / libdir).glob("libnccl.so*")):
                return root
    return None


def plan_build(request: Request, interp: Interpreter, tools: Toolchain, cuda: Cuda, env: Mapping[str, str],
               link_dir: Path, system_nccl_roots: Sequence[Path] = (Path("/usr"), Path("/usr/local"))) -> BuildPlan:
    """The variables, patches and cache key of the build ``request`` asks for on this machine."""
    missing = [name for name, path in (("cmake", tools.cmake), ("a C++ compiler (c++)", tools.cxx),
                                       ("make or ninja", tools.make or tools.ninja)) if path is None]
    if missing:
        raise BuildError(f"building Horovod needs cmake, a C++ compiler and make (or ninja): {', '.join(missing)} "
                         "not found on the PATH")
    if interp.torch_version is None:
        raise BuildError(f"{interp.executable} cannot import torch, which Horovod is built against")
    if request.with_tensorflow and interp.tensorflow_version is None:
        raise BuildError(f"TensorFlow support was asked for, but {interp.executable} has no tensorflow")
    check_request(request, interp, cuda)
    notes: list[str] = []
    derived: dict[str, str] = {
        "HOROVOD_WITH_PYTORCH": "1",
        "HOROVOD_WITH_TENSORFLOW" if request.with_tensorflow else "HOROVOD_WITHOUT_TENSORFLOW": "1",
        "HOROVOD_WITH_MPI" if request.with_mpi else "HOROVOD_WITHOUT_MPI": "1",
        "HOROVOD_WITH_GLOO": "1",
        "HOROVOD_WITHOUT_MXNET": "1",
        "HOROVOD_CMAKE": tools.cmake or "cmake",
        "MAKEFLAGS": f"-j{interp.cpus}",
    }
    if request.with_tensorflow:
        derived["TF_USE_LEGACY_KERAS"] = "1"  # Horovod's TF build imports tf.keras
    patches = [CXX17_TOP, CXX17_TORCH]
    if request.with_tensorflow:
        patches.append(NO_XLA_OPS)
    nccl_link = None
    cc_list: tuple[str, ...] = ()
    if request.gpu_operations == "NCCL":
        patches.append(CUDA17)
        assert cuda.nvcc is not None  # check_request
        derived["HOROVOD_GPU_OPERATIONS"] = "NCCL"
        cuda_home = str(Path(cuda.nvcc).resolve().parent.parent)
        derived["HOROVOD_CUDA_HOME"] = env.get("HOROVOD_CUDA_HOME") or cuda_home
        if cuda.nvcc_release and cuda.torch_cuda and cuda.nvcc_release.split(".")[0] != cuda.torch_cuda.split(".")[0]:
            notes.append(f"warning: nvcc is CUDA {cuda.nvcc_release} but torch was built with CUDA "
                         f"{cuda.torch_cuda}; the build may fail or Horovod may not load")
        if env.get("HOROVOD_BUILD_CUDA_CC_LIST"):
            cc_list = check_cc_list(env["HOROVOD_BUILD_CUDA_CC_LIST"])
        elif cuda.gpu_caps:
            cc_list = cuda.gpu_caps
            notes.append(f"CUDA compute capability {','.join(cc_list)} (the local GPUs)")
        elif cuda.torch_arch_caps:
            cc_list = cuda.torch_arch_caps
            notes.append(f"no GPU visible: CUDA compute capabilities {','.join(cc_list)} (those torch was built for)")
        else:
            raise BuildError("cannot tell which GPU to build for (nvidia-smi and torch see none, torch lists no "
                             "architectures): set HOROVOD_BUILD_CUDA_CC_LIST, e.g. 90 for an H100/H200")
        derived["HOROVOD_BUILD_CUDA_CC_LIST"] = ",".join(cc_list)
        # Link NCCL as a shared library: the process then uses the one NCCL that torch has loaded already.
        derived["HOROVOD_NCCL_LINK"] = "SHARED"
        user_nccl = [k for k in ("HOROVOD_NCCL_HOME", "HOROVOD_NCCL_INCLUDE", "HOROVOD_NCCL_LIB") if env.get(k)]
        wheel = find_wheel_nccl(cuda.site_dirs)
        if user_nccl:
            notes.append(f"NCCL from {', '.join(f'{k}={env[k]}' for k in user_nccl)}")
        elif wheel is not None:
            include, library = wheel
            # The wheel ships only libnccl.so.2; the linker's -lnccl needs libnccl.so, made beside the venv.
            derived["HOROVOD_NCCL_INCLUDE"] = str(include)
            derived["HOROVOD_NCCL_LIB"] = str(link_dir)
            nccl_link = (link_dir / NCCL_LINK_NAME, library)
            notes.append(f"NCCL from the wheel: {library}")
        else:
            roots = [Path(derived["HOROVOD_CUDA_HOME"]), *system_nccl_roots]
            found = find_system_nccl(roots)
            if found is None:
                raise BuildError("HOROVOD_GPU_OPERATIONS=NCCL: no NCCL found (no nvidia-nccl-* wheel in "
                                 f"{', '.join(map(str, cuda.site_dirs)) or 'the site packages'}, no nccl.h with "
                                 f"libnccl.so under {', '.join(map(str, roots))}): set HOROVOD_NCCL_HOME")
            derived["HOROVOD_NCCL_HOME"] = str(found)
            notes.append(f"NCCL from the system: {found}")
    if tools.make is None:  # CMake's default generator needs make; ninja runs in parallel by itself
        derived["CMAKE_GENERATOR"] = "Ninja"
        notes.append(f"no make: CMake generates for ninja ({tools.ninja})")
    if tools.cmake_version and tools.cmake_version[0] >= 4:
        # CMake 4 refuses cmake_minimum_required below 3.5, which third_party/gloo still declares.
        derived["CMAKE_POLICY_VERSION_MINIMUM"] = "3.5"
        notes.append(f"CMake {'.'.join(map(str, tools.cmake_version))}: CMAKE_POLICY_VERSION_MINIMUM=3.5")
    if tools.gcc_major is not None and tools.gcc_major >= 13:
        patches.append(GCC13_GROUP_TABLE)
        derived["CXXFLAGS"] = f"{env.get('CXXFLAGS', '')} {GCC13_FORCED_INCLUDES}".strip()
        notes.append(f"GCC {tools.gcc_major}: group_table.h includes and CXXFLAGS {GCC13_FORCED_INCLUDES}")
    final = dict(derived)
    for name in derived:
        if name.startswith("HOROVOD_") and env.get(name) and env[name] != derived[name]:
            final[name] = env[name]
            notes.append(f"kept {name}={env[name]} from the environment")
    return BuildPlan(env=final, patches=tuple(patches), notes=notes, nccl_link=nccl_link,
                key=cache_key(interp, request, cc_list))


def make_nccl_link(link: Path, library: Path) -> None:
    """``link`` (…/libnccl.so) → ``library`` (the wheel's libnccl.so.2), replacing an older link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(library)


def cache_key(interp: Interpreter, request: Request, cc_list: Sequence[str] = ()) -> str:
    """The wheel cache's key: what the wheel links against and what it was built with.

    The CPU build keeps the key it always had (``py311-torch2.13.0+cpu-tf2.21.0-cpu``), so wheels cached before
    this module existed are found; the GPU variant adds the operations, compute capabilities and controllers.
    """
    key = f"py{interp.version[0]}{interp.version[1]}-torch{interp.torch_version}"
    key += f"-tf{interp.tensorflow_version}" if request.with_tensorflow else "-notf"
    if request.gpu_operations:
        key += f"-{request.gpu_operations.lower()}-cc{'_'.join(cc_list)}"
    else:
        key += "-cpu"
    controllers = "mpi-gloo" if request.with_mpi else "gloo"
    if request.gpu_operations or controllers != "mpi-gloo":
        key += f"-{controllers}"
    return key


# ---------------------------------------------------------------- probing (runs the tools)


def _run(argv: Sequence[str], timeout: float = 60) -> str:
    """stdout (and stderr) of a command, "" when it cannot run."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr if proc.returncode == 0 else ""


def probe_interpreter() -> Interpreter:
    """This interpreter, its torch and TensorFlow (by distribution metadata: nothing heavy is imported)."""
    return Interpreter(executable=sys.executable, version=sys.version_info[:2],
                       torch_version=distribution_version("torch"),
                       tensorflow_version=distribution_version("tensorflow-cpu", "tensorflow"),
                       cpus=os.cpu_count() or 1)


def probe_toolchain(env: Mapping[str, str]) -> Toolchain:
    path = env.get("PATH", os.defpath)
    # pip's cmake package puts cmake beside the interpreter, which need not be on the PATH
    beside_python = str(Path(sys.executable).parent)
    cmake = shutil.which("cmake", path=path) or shutil.which("cmake", path=beside_python)
    cxx = shutil.which(env.get("CXX") or "c++", path=path) or shutil.which("g++", path=path)
    return Toolchain(cmake=cmake, cmake_version=parse_cmake_version(_run([cmake, "--version"])) if cmake else (),
                     cxx=cxx, gcc_major=parse_gcc_major(_run([cxx, "--version"])) if cxx else None,
                     make=shutil.which("make", path=path), mpicc=shutil.which("mpicc", path=path),
                     ninja=shutil.which("ninja", path=path) or shutil.which("ninja", path=beside_python))


def find_nvcc(env: Mapping[str, str]) -> str | None:
    """nvcc from HOROVOD_CUDA_HOME, CUDA_HOME, CUDA_PATH, the PATH, then /usr/local/cuda."""
    for var in ("HOROVOD_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        if env.get(var) and (Path(env[var]) / "bin" / "nvcc").is_file():
            return str(Path(env[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if on_path:
        return on_path
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def site_dirs() -> tuple[Path, ...]:
    """The directories of sys.path that hold installed packages, in sys.path order."""
    return tuple(Path(p) for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages",
                                                                                           "dist-packages"))


def probe_cuda(env: Mapping[str, str]) -> Cuda:
    """torch's CUDA, nvcc, the local GPUs' compute capabilities (imports torch: only for an NCCL request)."""
    torch_cuda, arch_caps, torch_gpu_caps = None, (), ()
    try:
        import torch  # noqa: PLC0415 - only an NCCL request pays for this import

        torch_cuda = torch.version.cuda
        if torch_cuda:
            arch_caps = caps_from_arch_list(torch.cuda.get_arch_list())
            if torch.cuda.is_available():
                torch_gpu_caps = tuple(sorted({"{}{}".format(*torch.cuda.get_device_capability(i))
                                               for i in range(torch.cuda.device_count())}, key=int))
    except Exception:  # noqa: BLE001 - no torch or a broken one: check_request names it
        pass
    nvcc = find_nvcc(env)
    smi = shutil.which("nvidia-smi", path=env.get("PATH", os.defpath))
    gpu_caps = parse_compute_caps(_run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"])) if smi else ()
    return Cuda(torch_cuda=torch_cuda, nvcc=nvcc, nvcc_release=parse_nvcc_release(_run([nvcc, "--version"]))
                if nvcc else None, gpu_caps=gpu_caps or torch_gpu_caps, torch_arch_caps=arch_caps,
                site_dirs=site_dirs())


# ---------------------------------------------------------------- command line


def _note(message: str) -> None:
    print(f"[horovod_build] {message}", file=sys.stderr)


def _request_here(mode: str) -> Request:
    return make_request(mode, os.environ, shutil.which("mpicc", path=os.environ.get("PATH", os.defpath)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.horovod_build", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="refuse a bad request (knobs, NCCL without CUDA, offline dir, tools)")
    plan = commands.add_parser("plan", help="print the build's export lines and LARSCALE_WHEEL_KEY")
    patch = commands.add_parser("patch", help="patch an unpacked Horovod sdist")
    patch.add_argument("src", type=Path)
    verify = commands.add_parser("verify", help="exit 1 unless the installed Horovod has what the mode asks")
    for sub in (check, plan, patch, verify):
        sub.add_argument("--mode", default=os.environ.get("LARSCALE_TORCH", "pin"), help="pin or system")
    verify.add_argument("--report", action="store_true", help="also print one line of what it was built with")
    check.add_argument("--offline", type=Path, help="the offline directory to check")
    check.add_argument("--prerequisites", action="store_true",
                       help="also refuse when the build tools (mpicc, c++, cmake, make) are not on the PATH")
    plan.add_argument("--link-dir", type=Path, required=True, help="where to make libnccl.so for the wheel's NCCL")
    link = commands.add_parser("link-site", help="let VENV see this interpreter's own packages")
    link.add_argument("venv", type=Path)
    missing = commands.add_parser("missing", help="distributions setup.cfg declares that this interpreter lacks")
    missing.add_argument("setup_cfg", type=Path)
    missing.add_argument("--extras", default="", help="comma-separated extras besides install_requires")
    offline_check = commands.add_parser("offline-check", help="list the files the build takes from DIR")
    offline_check.add_argument("directory", type=Path)
    prepare = commands.add_parser("prepare-offline", help="download the sdist and cffi wheels into DIR")
    prepare.add_argument("directory", type=Path)
    prepare.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                         help="CPython version of the machine that will build (default: this one's)")
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except BuildError as error:
        print(f"[horovod_build] error: {error}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    env = os.environ
    if args.command == "check":
        request = _request_here(args.mode)
        cuda = probe_cuda(env) if request.gpu_operations else Cuda(None, None, None)
        check_request(request, probe_interpreter(), cuda)
        if args.offline:
            check_offline_dir(args.offline, sys.version_info[:2])
        if args.prerequisites:
            lacking = missing_prerequisites(env, request.with_mpi, beside_python=str(Path(sys.executable).parent))
            if lacking:
                raise BuildError(prerequisites_message(lacking))
        return 0
    if args.command in ("plan", "patch"):
        request = _request_here(args.mode)
        interp, tools = probe_interpreter(), probe_toolchain(env)
        cuda = probe_cuda(env) if request.gpu_operations else Cuda(None, None, None)
        link_dir = getattr(args, "link_dir", None) or Path(os.devnull)
        plan = plan_build(request, interp, tools, cuda, env, link_dir)
        if args.command == "patch":
            for p in plan.patches:
                _note(f"patch {p.path} ({p.why}): {p.apply(args.src)}")
            return 0
        for note in plan.notes:
            _note(note)
        if plan.nccl_link is not None:
            make_nccl_link(*plan.nccl_link)
        sys.stdout.write(plan.shell())
        return 0
    if args.command == "verify":
        lacking = verify_installed(_request_here(args.mode).features)
        if lacking:
            _note(f"installed Horovod lacks: {', '.join(lacking)}")
            return 1
        if args.report:
            _note(installed_summary())
        return 0
    if args.command == "link-site":
        parents = own_site_dirs()
        purelib = Path(subprocess.run([str(args.venv / "bin" / "python"), "-c",
                                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      capture_output=True, text=True, check=True).stdout.strip())
        if parents:
            (purelib / "larscale-parent-site.pth").write_text(site_link_text(parents))
            _note(f"{args.venv} sees the packages of {', '.join(parents)}")
        return 0
    if args.command == "missing":
        if not args.setup_cfg.is_file():
            raise BuildError(f"{args.setup_cfg}: no such file")
        extras = [e for e in args.extras.split(",") if e]
        print(" ".join(missing_distributions(declared_requirements(args.setup_cfg.read_text(), extras))))
        return 0
    if args.command == "offline-check":
        print(" ".join(check_offline_dir(args.directory, sys.version_info[:2])))
        return 0
    if args.command == "prepare-offline":
        files = prepare_offline(args.directory, args.python_version, [sys.executable, "-m", "pip"])
        total = sum((args.directory / f).stat().st_size for f in files)
        _note(f"{args.directory}: {', '.join(files)} ({total / 2**20:.1f} MiB) for CPython {args.python_version}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
