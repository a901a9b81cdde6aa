"""What bootstrap.sh's Horovod build takes from outside: the tools on the PATH, the packages a venv lacks, the
offline directory.

Standard library only (it runs before anything is installed). Every refusal is a ``BuildError`` whose message is
one line naming the culprit; ``tools/horovod_build.py`` holds the build's own decisions and the command line.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HOROVOD_VERSION = "0.28.1"
SDIST_NAME = f"horovod-{HOROVOD_VERSION}.tar.gz"
# Horovod's setup.py puts cffi in setup_requires when PyTorch is built; without a network setuptools cannot fetch
# it, so the offline directory carries it and its one dependency as wheels, installed before the build.
OFFLINE_WHEELS = ("cffi==2.1.1", "pycparser==3.0")
OFFLINE_MANIFEST = "larscale-offline.json"
# pip's platform tags for a manylinux x86-64 machine (pip matches each tag exactly).
OFFLINE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                     "manylinux2014_x86_64", "manylinux1_x86_64")
# Requirements a system-mode venv does without: torch is the system's, TensorFlow is not built there, ruff only lints.
SYSTEM_MODE_SKIPPED = ("torch", "tensorflow-cpu", "tf-keras", "ruff")


class BuildError(Exception):
    """A request that cannot be built; the message is one line that names the culprit."""


# ---------------------------------------------------------------- build tools on the PATH


@dataclass(frozen=True)
class Prerequisite:
    """A tool the build needs, the commands that provide it, and where a user gets it."""

    what: str
    commands: tuple[str, ...]   # any one of them on the PATH will do
    debian: str                 # apt-get install ...
    rhel: str                   # dnf install ...
    module: str                 # module load ... (names vary by site; these are the usual ones)


MPI = Prerequisite("an MPI with mpicc", ("mpicc",), "libopenmpi-dev openmpi-bin",
                   "openmpi-devel (then module load mpi/openmpi-x86_64)", "openmpi")
CXX = Prerequisite("a C++ compiler", ("c++", "g++"), "g++", "gcc-c++", "gcc")
CMAKE = Prerequisite("CMake", ("cmake",), "cmake", "cmake", "cmake")
MAKE = Prerequisite("make or ninja", ("make", "ninja"), "make", "make", "ninja")


def missing_prerequisites(env: Mapping[str, str], need_mpi: bool, beside_python: str | None = None
                          ) -> list[Prerequisite]:
    """The prerequisites none of whose commands is on ``env``'s PATH (a compiler named by CXX counts; pip's cmake
    or ninja beside the interpreter count too)."""
    path = env.get("PATH", os.defpath)
    lacking = []
    for tool in (MPI, CXX, CMAKE, MAKE) if need_mpi else (CXX, CMAKE, MAKE):
        commands = [env["CXX"].split()[0], *tool.commands] if tool is CXX and env.get("CXX") else tool.commands
        found = any(shutil.which(c, path=path) for c in commands) or (
            beside_python is not None and tool in (CMAKE, MAKE)
            and any(shutil.which(c, path=beside_python) for c in commands))
        if not found:
            lacking.append(tool)
    return lacking


def prerequisites_message(lacking: Sequence[Prerequisite]) -> str:
    """One line: what is missing, and its Debian, RHEL and module names."""
    names = ", ".join(f"{t.what} ({'/'.join(t.commands)})" for t in lacking)
    debian = " ".join(t.debian for t in lacking)
    rhel = " ".join(t.rhel for t in lacking)
    modules = " ".join(t.module for t in lacking)
    return (f"building Horovod needs {names} on the PATH: load them (module load {modules}; names vary by site) "
            f"or install them (Debian: apt-get install {debian}; RHEL: dnf install {rhel}), then run "
            "./bootstrap.sh again")


# ---------------------------------------------------------------- parsing tool output (pure)


def parse_gcc_major(version_text: str) -> int | None:
    """GCC's major version from ``c++ --version``; None for clang or anything unrecognised."""
    first = version_text.strip().splitlines()[0] if version_text.strip() else ""
    if "clang" in first.lower():
        return None
    match = re.search(r"\b(\d+)\.\d+(\.\d+)?\b", first)
    return int(match.group(1)) if match else None


def parse_cmake_version(version_text: str) -> tuple[int, ...]:
    match = re.search(r"cmake version (\d+(?:\.\d+)*)", version_text)
    return tuple(int(x) for x in match.group(1).split(".")) if match else ()


def parse_nvcc_release(version_text: str) -> str | None:
    match = re.search(r"release (\d+\.\d+)", version_text)
    return match.group(1) if match else None


def parse_compute_caps(nvidia_smi_output: str) -> tuple[str, ...]:
    """``nvidia-smi --query-gpu=compute_cap --format=csv,noheader`` ("9.0" per GPU) → ("90",); unreadable → ()."""
    caps = set()
    for line in nvidia_smi_output.splitlines():
        match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line)
        if match:
            caps.add(f"{match.group(1)}{match.group(2)}")
    return tuple(sorted(caps, key=int))


def caps_from_arch_list(arch_list: Sequence[str]) -> tuple[str, ...]:
    """``torch.cuda.get_arch_list()`` (["sm_80", "sm_90a", "compute_90"]) → ("80", "90")."""
    caps = {m.group(1) for a in arch_list if (m := re.fullmatch(r"sm_(\d+)[a-z]?", a))}
    return tuple(sorted(caps, key=int))


def check_cc_list(value: str) -> tuple[str, ...]:
    """A user's HOROVOD_BUILD_CUDA_CC_LIST ("80,90"), checked."""
    items = [v.strip() for v in value.split(",")]
    if not items or not all(re.fullmatch(r"\d{2,3}", v) for v in items):
        raise BuildError(f"HOROVOD_BUILD_CUDA_CC_LIST={value}: expected comma-separated compute capabilities "
                         "without dots, such as 80,90")
    return tuple(items)


# ---------------------------------------------------------------- venv seeing PYTHON's packages


def site_link_text(parent_site_dirs: Sequence[str]) -> str:
    """A .pth file's text that adds ``parent_site_dirs`` as site dirs (their own .pth files are processed too).

    ``python -m venv --system-site-packages`` run by a venv's python sees the base interpreter's packages, not
    that venv's: /opt/torch/.venv/bin/python3 makes a venv without /opt/torch/.venv's torch. This file adds them,
    after the new venv's own site-packages, so what bootstrap installs there wins.
    """
    return "".join(f"import site; site.addsitedir({d!r})\n" for d in parent_site_dirs)


def own_site_dirs() -> list[str]:
    """This interpreter's own package dirs when it is a venv (empty for a base interpreter)."""
    if sys.prefix == sys.base_prefix:
        return []
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


# ---------------------------------------------------------------- requirements of a system-mode venv


def requirement_names(text: str) -> list[str]:
    """Distribution names of requirement lines (comments, options and version specifiers dropped)."""
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.append(match.group(0))
    return names


def declared_requirements(setup_cfg_text: str, extras: Sequence[str]) -> list[str]:
    """The distribution names setup.cfg declares: install_requires, then each of ``extras`` (the one place the
    project's dependencies are listed)."""
    config = configparser.ConfigParser()
    config.read_string(setup_cfg_text)
    names = requirement_names(config.get("options", "install_requires", fallback=""))
    for extra in extras:
        if not config.has_option("options.extras_require", extra):
            raise BuildError(f"setup.cfg declares no extra [{extra}]")
        names += requirement_names(config.get("options.extras_require", extra))
    return list(dict.fromkeys(names))


def missing_distributions(names: Sequence[str], skipped: Sequence[str] = SYSTEM_MODE_SKIPPED) -> list[str]:
    skip = {_normalise(n) for n in skipped}
    return [n for n in names if _normalise(n) not in skip and distribution_version(n) is None]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` that is installed (by metadata: nothing is imported)."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


# ---------------------------------------------------------------- the offline directory


def wheel_fits(filename: str, python: tuple[int, int]) -> bool:
    """Whether a wheel file installs on CPython ``python`` on x86-64 Linux (by its tags)."""
    parts = filename[:-4].split("-") if filename.endswith(".whl") else []
    if len(parts) < 5:
        return False
    py_tags, abi_tags, platform_tags = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    cp = f"cp{python[0]}{python[1]}"
    python_ok = cp in py_tags or "py3" in py_tags or any(
        t.startswith("cp3") and "abi3" in abi_tags and int(t[3:] or 0) <= python[1] for t in py_tags)
    abi_ok = cp in abi_tags or "none" in abi_tags or "abi3" in abi_tags
    platform_ok = "any" in platform_tags or any(t.endswith("x86_64") and "linux" in t for t in platform_tags)
    return python_ok and abi_ok and platform_ok


def check_offline_dir(directory: Path, python: tuple[int, int]) -> list[str]:
    """The files the build takes from ``directory`` (sdist, then wheels); BuildError names what is missing."""
    if not directory.is_dir():
        raise BuildError(f"LARSCALE_OFFLINE_DIR={directory}: no such directory (prepare one on a networked machine: "
                         f"./bootstrap.sh --prepare-offline DIR --python-version {python[0]}.{python[1]})")
    sdist = directory / SDIST_NAME
    if not sdist.is_file():
        raise BuildError(f"LARSCALE_OFFLINE_DIR={directory}: lacks {SDIST_NAME}")
    files = [sdist.name]
    for requirement in OFFLINE_WHEELS:
        name, version = requirement.split("==")
        candidates = sorted(p.name for p in directory.glob(f"{name}-{version}-*.whl"))
        fitting = [c for c in candidates if wheel_fits(c, python)]
        if not fitting:
            seen = f" (has {', '.join(candidates)})" if candidates else ""
            raise BuildError(f"LARSCALE_OFFLINE_DIR={directory}: no {requirement} wheel for CPython "
                             f"{python[0]}.{python[1]} on x86-64 Linux{seen}")
        files.append(fitting[0])
    manifest = directory / OFFLINE_MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("sha256", {})
        for name in files:
            if name in recorded and _sha256(directory / name) != recorded[name]:
                raise BuildError(f"LARSCALE_OFFLINE_DIR={directory}: {name} differs from {OFFLINE_MANIFEST} "
                                 "(a truncated or replaced copy)")
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def offline_download_commands(directory: Path, python_version: str, pip: Sequence[str]) -> list[list[str]]:
    """The pip commands that fill an offline directory for CPython ``python_version`` on manylinux x86-64."""
    digits = python_version.replace(".", "")
    sdist = [*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(directory),
             f"horovod=={HOROVOD_VERSION}"]
    wheels = [*pip, "download", "--no-deps", "--only-binary", ":all:", "--python-version", python_version,
              "--implementation", "cp", "--abi", f"cp{digits}"]
    for platform in OFFLINE_PLATFORMS:
        wheels += ["--platform", platform]
    return [sdist, [*wheels, "-d", str(directory), *OFFLINE_WHEELS]]


def prepare_offline(directory: Path, python_version: str, pip: Sequence[str]) -> list[str]:
    """Download the sdist and wheels into ``directory``, check them and write the manifest; returns the files."""
    if not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise BuildError(f"--python-version {python_version}: expected a CPython version such as 3.12")
    directory.mkdir(parents=True, exist_ok=True)
    for argv in offline_download_commands(directory, python_version, pip):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BuildError(f"{' '.join(argv[:4])} ... failed: {tail}")
    major, minor = (int(x) for x in python_version.split("."))
    files = check_offline_dir(directory, (major, minor))
    manifest = {"horovod": HOROVOD_VERSION, "python": python_version, "wheels": list(OFFLINE_WHEELS),
                "sha256": {name: _sha256(directory / name) for name in files}}
    (directory / OFFLINE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return files
