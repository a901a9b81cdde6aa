"""tools/horovod_build.py and tools/build_inputs.py: patches on the real Horovod sdist, build options from real
(fake-machine) file layouts, the build tools on the PATH, the offline directory, the error lines, and bootstrap.sh
refusing bad requests before it touches anything."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tools import build_inputs as bi
from tools import horovod_build as hb

CPU_INTERP = hb.Interpreter(executable="/venv/bin/python", version=(3, 11), torch_version="2.13.0+cpu",
                            tensorflow_version="2.21.0", cpus=2)
GPU_INTERP = hb.Interpreter(executable="/opt/torch/.venv/bin/python3", version=(3, 12),
                            torch_version="2.11.0+cu130", tensorflow_version=None, cpus=16)
DEBIAN12_TOOLS = hb.Toolchain(cmake="/usr/bin/cmake", cmake_version=(3, 25, 1), cxx="/usr/bin/c++", gcc_major=12,
                              make="/usr/bin/make", mpicc="/usr/bin/mpicc")
H200_TOOLS = hb.Toolchain(cmake="/usr/local/bin/cmake", cmake_version=(4, 0, 3), cxx="/usr/bin/c++", gcc_major=13,
                          make="/usr/bin/make", mpicc=None)
NO_CUDA = hb.Cuda(torch_cuda=None, nvcc=None, nvcc_release=None)


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory) -> Path:
    """An offline directory for CPython 3.12 (the GPU machine's): LARSCALE_OFFLINE_DIR or the repo's .cache/offline
    when one is prepared, else made here by the documented command (3.6 MiB from PyPI, a few seconds); skipped only
    when the package index cannot be reached."""
    for folder in (os.environ.get("LARSCALE_OFFLINE_DIR"), REPO / ".cache" / "offline"):
        if folder and (Path(folder) / bi.OFFLINE_MANIFEST).is_file():
            return Path(folder)
    folder = tmp_path_factory.mktemp("offline")
    proc = subprocess.run([str(REPO / "bootstrap.sh"), "--prepare-offline", str(folder), "--python-version", "3.12"],
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0 and "pip download" in proc.stderr:
        pytest.skip(f"the package index is out of reach: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    return folder


def fake_cuda_machine(root: Path, nccl_wheel: bool = True) -> hb.Cuda:
    """A CUDA toolkit (an nvcc file) and a site-packages with the nvidia-nccl-cu13 layout, as real files."""
    nvcc = root / "cuda-13.0" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    site = root / "site-packages"
    (site / "torch").mkdir(parents=True)
    if nccl_wheel:
        (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "include").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"\x7fELF fake library")
        (site / "nvidia" / "nccl" / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n")
    return hb.Cuda(torch_cuda="13.0", nvcc=str(nvcc), nvcc_release="13.0", gpu_caps=("90",),
                   torch_arch_caps=("75", "80", "86", "90", "100", "120"), site_dirs=(site,))


def gpu_request(**env: str) -> hb.Request:
    return hb.make_request("system", {"HOROVOD_GPU_OPERATIONS": "NCCL", **env}, mpicc=None)


# ---------------------------------------------------------------- patches


def test_patches_apply_to_the_real_sdist_once_and_then_report_applied(tmp_path, offline_dir):
    with tarfile.open(offline_dir / bi.SDIST_NAME) as archive:
        archive.extractall(tmp_path, filter="data")
    src = tmp_path / f"horovod-{bi.HOROVOD_VERSION}"
    every_patch = [hb.CXX17_TOP, hb.CXX17_TORCH, hb.NO_XLA_OPS, hb.CUDA17, hb.GCC13_GROUP_TABLE]
    assert [p.apply(src) for p in every_patch] == ["applied"] * 5
    assert [p.apply(src) for p in every_patch] == ["already applied"] * 5
    top = (src / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CXX_STANDARD 14)" not in top and "set(CMAKE_CXX_STANDARD 17)\n" in top
    assert "CMAKE_CXX_STANDARD 14" not in (src / "horovod/torch/CMakeLists.txt").read_text()
    cuda = (src / "horovod/common/ops/cuda/CMakeLists.txt").read_text()
    assert "set(CMAKE_CUDA_STANDARD 17)" in cuda and "CMAKE_CUDA_STANDARD 11" not in cuda
    assert "xla_mpi_ops.cc" not in (src / "horovod/tensorflow/CMakeLists.txt").read_text()
    header = (src / "horovod/common/group_table.h").read_text()
    assert header.index("#include <string>") < header.index("class GroupTable")
    assert header.index("#include <cstdint>") < header.index("int32_t")


def test_a_patch_stops_the_build_when_the_sdist_text_changed(tmp_path):
    target = tmp_path / "horovod" / "common" / "ops" / "cuda" / "CMakeLists.txt"
    target.parent.mkdir(parents=True)
    target.write_text("set(CMAKE_CUDA_STANDARD 14)\n")          # neither the old nor the patched text
    with pytest.raises(bi.BuildError, match=r"CMakeLists.txt holds 'set\(CMAKE_CUDA_STANDARD 11\)' 0 times"):
        hb.CUDA17.apply(tmp_path)
    target.write_text("set(CMAKE_CUDA_STANDARD 11)\n# again\nset(CMAKE_CUDA_STANDARD 11)\n")
    with pytest.raises(bi.BuildError, match="2 times"):
        hb.CUDA17.apply(tmp_path)
    assert target.read_text().count("11") == 2                   # a refused patch writes nothing
    with pytest.raises(bi.BuildError, match="group_table.h does not exist"):
        hb.GCC13_GROUP_TABLE.apply(tmp_path)


def test_top_cmakelists_is_patched_although_it_already_mentions_cxx17_for_gloo(tmp_path):
    # The release's top CMakeLists.txt sets C++17 for third_party/gloo in a string; only the project line counts.
    (tmp_path / "CMakeLists.txt").write_text('set(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)\n'
                                             'string(PREPEND GLOO_CMAKE "set(CMAKE_CXX_STANDARD 17)\\n")\n')
    assert hb.CXX17_TOP.apply(tmp_path) == "applied"
    assert "CMAKE_CXX_STANDARD 14" not in (tmp_path / "CMakeLists.txt").read_text()


# ---------------------------------------------------------------- the CPU build is what it always was


def test_cpu_plan_keeps_the_existing_variables_patches_and_cache_key():
    request = hb.make_request("pin", {}, mpicc="/usr/bin/mpicc")
    plan = hb.plan_build(request, CPU_INTERP, DEBIAN12_TOOLS, NO_CUDA, {}, Path("/unused"))
    assert plan.key == "py311-torch2.13.0+cpu-tf2.21.0-cpu"      # the key of wheels cached before this module
    assert plan.env == {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITH_TENSORFLOW": "1", "HOROVOD_WITH_MPI": "1",
                        "HOROVOD_WITH_GLOO": "1", "HOROVOD_WITHOUT_MXNET": "1", "HOROVOD_CMAKE": "/usr/bin/cmake",
                        "MAKEFLAGS": "-j2", "TF_USE_LEGACY_KERAS": "1"}
    assert plan.patches == (hb.CXX17_TOP, hb.CXX17_TORCH, hb.NO_XLA_OPS)
    assert plan.nccl_link is None
    assert request.features == ("torch", "gloo", "tensorflow", "mpi")


def test_ninja_builds_where_there_is_no_make():
    tools = hb.Toolchain(cmake="/usr/bin/cmake", cmake_version=(4, 0, 3), cxx="/usr/bin/c++", gcc_major=13,
                         make=None, mpicc=None, ninja="/usr/bin/ninja")
    plan = hb.plan_build(hb.make_request("pin", {}, None), CPU_INTERP, tools, NO_CUDA, {}, Path("/x"))
    assert plan.env["CMAKE_GENERATOR"] == "Ninja"
    assert "CMAKE_GENERATOR" not in hb.plan_build(hb.make_request("pin", {}, None), CPU_INTERP, DEBIAN12_TOOLS,
                                                  NO_CUDA, {}, Path("/x")).env


def test_toolchain_patches_only_where_gcc13_and_cmake4_need_them():
    request = hb.make_request("pin", {}, mpicc="/usr/bin/mpicc")
    plan = hb.plan_build(request, CPU_INTERP, H200_TOOLS, NO_CUDA, {"CXXFLAGS": "-O2"}, Path("/unused"))
    assert plan.env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5"
    assert plan.env["CXXFLAGS"] == "-O2 -include string -include cstdint -include stdexcept -include limits"
    assert hb.GCC13_GROUP_TABLE in plan.patches and hb.CUDA17 not in plan.patches
    assert plan.key == "py311-torch2.13.0+cpu-tf2.21.0-cpu"     # the toolchain does not change what is built


# ---------------------------------------------------------------- the NCCL build


def test_nccl_plan_from_a_fake_site_packages_with_the_nccl_wheel(tmp_path):
    cuda = fake_cuda_machine(tmp_path)
    link_dir = tmp_path / "venv" / "larscale-nccl"
    plan = hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, cuda, {}, link_dir)
    site = cuda.site_dirs[0]
    assert plan.env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert plan.env["HOROVOD_NCCL_INCLUDE"] == str(site / "nvidia" / "nccl" / "include")
    assert plan.env["HOROVOD_NCCL_LIB"] == str(link_dir)
    assert plan.env["HOROVOD_NCCL_LINK"] == "SHARED"
    assert plan.env["HOROVOD_BUILD_CUDA_CC_LIST"] == "90"
    assert plan.env["HOROVOD_CUDA_HOME"] == str(tmp_path / "cuda-13.0")
    assert plan.env["HOROVOD_WITHOUT_TENSORFLOW"] == "1" and plan.env["HOROVOD_WITHOUT_MPI"] == "1"
    assert plan.env["CMAKE_POLICY_VERSION_MINIMUM"] == "3.5" and "-include string" in plan.env["CXXFLAGS"]
    assert set(plan.patches) == {hb.CXX17_TOP, hb.CXX17_TORCH, hb.CUDA17, hb.GCC13_GROUP_TABLE}
    assert plan.key == "py312-torch2.11.0+cu130-notf-nccl-cc90-gloo"
    assert gpu_request().features == ("torch", "gloo", "nccl")
    # the link the linker's -lnccl needs, made for real and resolving to the wheel's library
    hb.make_nccl_link(*plan.nccl_link)
    hb.make_nccl_link(*plan.nccl_link)                             # idempotent
    link = link_dir / "libnccl.so"
    assert link.is_symlink() and link.resolve() == site / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    assert link.read_bytes() == b"\x7fELF fake library"
    # the shell text bootstrap.sh evaluates
    shell = plan.shell()
    assert "export HOROVOD_NCCL_LIB=" in shell and shell.endswith(f"LARSCALE_WHEEL_KEY={plan.key}\n")


def test_cache_key_changes_with_every_gpu_variant(tmp_path):
    cuda = fake_cuda_machine(tmp_path)
    keys = {
        hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, cuda, {}, tmp_path).key,
        hb.plan_build(gpu_request(HOROVOD_BUILD_CUDA_CC_LIST="80,90"), GPU_INTERP, H200_TOOLS, cuda,
                      {"HOROVOD_BUILD_CUDA_CC_LIST": "80,90"}, tmp_path).key,
        hb.plan_build(gpu_request(HOROVOD_WITH_MPI="1"), GPU_INTERP, H200_TOOLS, cuda, {}, tmp_path).key,
        hb.plan_build(hb.make_request("system", {}, mpicc=None), GPU_INTERP, H200_TOOLS, cuda, {}, tmp_path).key,
        hb.plan_build(hb.make_request("pin", {}, mpicc=None), CPU_INTERP, H200_TOOLS, cuda, {}, tmp_path).key,
    }
    assert keys == {"py312-torch2.11.0+cu130-notf-nccl-cc90-gloo", "py312-torch2.11.0+cu130-notf-nccl-cc80_90-gloo",
                    "py312-torch2.11.0+cu130-notf-nccl-cc90-mpi-gloo", "py312-torch2.11.0+cu130-notf-cpu-gloo",
                    "py311-torch2.13.0+cpu-tf2.21.0-cpu"}


def test_user_variables_win_and_nccl_home_replaces_the_wheel(tmp_path):
    cuda = fake_cuda_machine(tmp_path)
    env = {"HOROVOD_NCCL_HOME": "/opt/nccl", "HOROVOD_CUDA_HOME": "/opt/cuda", "HOROVOD_BUILD_CUDA_CC_LIST": "80,90"}
    plan = hb.plan_build(gpu_request(**env), GPU_INTERP, H200_TOOLS, cuda, env, tmp_path / "link")
    assert plan.nccl_link is None and "HOROVOD_NCCL_LIB" not in plan.env
    assert plan.env["HOROVOD_CUDA_HOME"] == "/opt/cuda" and plan.env["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"
    assert any("HOROVOD_NCCL_HOME=/opt/nccl" in note for note in plan.notes)


def test_system_nccl_when_no_wheel_and_an_error_line_when_none_at_all(tmp_path):
    cuda = fake_cuda_machine(tmp_path / "machine", nccl_wheel=False)
    usr = tmp_path / "usr"
    (usr / "include").mkdir(parents=True)
    (usr / "include" / "nccl.h").write_text("")
    (usr / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    (usr / "lib" / "x86_64-linux-gnu" / "libnccl.so.2").write_bytes(b"")
    plan = hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, cuda, {}, tmp_path / "link", system_nccl_roots=[usr])
    assert plan.env["HOROVOD_NCCL_HOME"] == str(usr) and plan.nccl_link is None
    with pytest.raises(bi.BuildError) as error:
        hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, cuda, {}, tmp_path / "link",
                      system_nccl_roots=[tmp_path / "nothing"])
    assert "no NCCL found" in str(error.value) and "HOROVOD_NCCL_HOME" in str(error.value)


def test_compute_capability_falls_back_to_torch_arch_list_then_fails_clearly(tmp_path):
    cuda = fake_cuda_machine(tmp_path)
    no_gpu = hb.Cuda(cuda.torch_cuda, cuda.nvcc, cuda.nvcc_release, (), ("80", "90"), cuda.site_dirs)
    assert hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, no_gpu, {}, tmp_path).env[
        "HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"
    nothing = hb.Cuda(cuda.torch_cuda, cuda.nvcc, cuda.nvcc_release, (), (), cuda.site_dirs)
    with pytest.raises(bi.BuildError, match="set HOROVOD_BUILD_CUDA_CC_LIST"):
        hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, nothing, {}, tmp_path)
    with pytest.raises(bi.BuildError, match="HOROVOD_BUILD_CUDA_CC_LIST=9.0"):
        hb.plan_build(gpu_request(), GPU_INTERP, H200_TOOLS, cuda, {"HOROVOD_BUILD_CUDA_CC_LIST": "9.0"}, tmp_path)


@pytest.mark.parametrize("make, culprit", [
    (lambda: hb.make_request("pin", {"HOROVOD_GPU_OPERATIONS": "NCCL"}, None), "LARSCALE_TORCH=system"),
    (lambda: hb.make_request("conda", {}, None), "LARSCALE_TORCH=conda"),
    (lambda: hb.make_request("system", {"HOROVOD_GPU_OPERATIONS": "DDL"}, None), "HOROVOD_GPU_OPERATIONS=DDL"),
    (lambda: hb.check_request(gpu_request(), GPU_INTERP, NO_CUDA), "is a CPU build"),
    (lambda: hb.check_request(gpu_request(), GPU_INTERP, hb.Cuda("13.0", None, None)), "no nvcc"),
    (lambda: hb.check_request(hb.make_request("system", {}, None),
                              hb.Interpreter("/usr/bin/python3", (3, 12), None, None, 4), NO_CUDA),
     "/usr/bin/python3 has no torch"),
    (lambda: hb.plan_build(hb.make_request("pin", {}, None), CPU_INTERP,
                           hb.Toolchain(None, (), "/usr/bin/c++", 12, None, None), NO_CUDA, {}, Path("/x")),
     "cmake, make or ninja not found"),
])
def test_bad_requests_are_refused_in_one_line_naming_the_culprit(make, culprit):
    with pytest.raises(bi.BuildError) as error:
        make()
    assert culprit in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- parsing the tools' output


def test_parsers_read_real_tool_output():
    assert bi.parse_gcc_major("g++ (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022") == 12
    assert bi.parse_gcc_major("g++ (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0\n") == 13
    assert bi.parse_gcc_major("Ubuntu clang version 18.1.3 (1ubuntu1)\nTarget: x86_64") is None
    assert bi.parse_cmake_version("cmake version 4.0.3\n\nCMake suite maintained by Kitware") == (4, 0, 3)
    assert bi.parse_nvcc_release("Cuda compilation tools, release 13.0, V13.0.48\nBuild cuda_13.0") == "13.0"
    assert bi.parse_compute_caps("9.0\n9.0\n8.0\n") == ("80", "90")
    assert bi.parse_compute_caps('Field "compute_cap" is not a valid field to query.') == ()
    assert bi.caps_from_arch_list(["sm_75", "sm_90a", "compute_90", "sm_100"]) == ("75", "90", "100")


def test_parsers_read_this_machines_tools():
    tools = hb.probe_toolchain(os.environ)
    if tools.cmake:
        assert len(tools.cmake_version) >= 2
    if tools.cxx and "clang" not in subprocess.run([tools.cxx, "--version"], capture_output=True, text=True).stdout:
        assert tools.gcc_major is not None and tools.gcc_major >= 7


def test_every_declared_dependency_is_named_once_and_pinned_in_constraints_only():
    setup_cfg = (REPO / "setup.cfg").read_text()
    declared = bi.declared_requirements(setup_cfg, ["train", "test"])
    config = configparser.ConfigParser()
    config.read_string(setup_cfg)
    lines = [line.strip() for key in ("train", "test") for line in config["options.extras_require"][key].splitlines()]
    lines += [line.strip() for line in config["options"]["install_requires"].splitlines()]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", line) for line in lines if line), lines      # no versions there
    assert [line for line in (REPO / "requirements.txt").read_text().splitlines()
            if line and not line.startswith("#")] == ["-e .[train,test]"]                   # no second list
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pinned = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    assert [n for n in declared if re.sub(r"[-_.]+", "-", n).lower() not in pinned] == []
    assert pinned["torch"].endswith("+cpu")          # torch==X alone is PyPI's CUDA build (GBs of nvidia-* wheels)


# ---------------------------------------------------------------- build tools on the PATH (module load)


def tool_dir(folder: Path, commands: list[str]) -> dict[str, str]:
    """An environment whose PATH is ``folder`` holding only ``commands`` (empty scripts), as real files."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in commands:
        (folder / command).write_text("#!/bin/sh\n")
        (folder / command).chmod(0o755)
    return {"PATH": str(folder)}


def test_missing_build_tools_are_named_once_with_debian_rhel_and_module_names(tmp_path):
    everything = tool_dir(tmp_path / "all", ["mpicc", "g++", "cmake", "ninja"])
    assert bi.missing_prerequisites(everything, need_mpi=True) == []
    bare = tool_dir(tmp_path / "bare", ["g++"])
    lacking = bi.missing_prerequisites(bare, need_mpi=True)
    assert lacking == [bi.MPI, bi.CMAKE, bi.MAKE]
    assert bi.missing_prerequisites(bare, need_mpi=False) == [bi.CMAKE, bi.MAKE]     # Gloo only: no MPI needed
    # pip's cmake and ninja beside the interpreter count; a compiler named by CXX counts
    beside = tool_dir(tmp_path / "venv-bin", ["cmake", "ninja"])["PATH"]
    assert bi.missing_prerequisites(bare, need_mpi=False, beside_python=beside) == []
    tool_dir(tmp_path / "icx", ["icpx", "make", "cmake"])
    assert bi.missing_prerequisites({"PATH": str(tmp_path / "icx"), "CXX": "icpx -O2"}, need_mpi=False) == []
    line = bi.prerequisites_message(lacking)
    assert "\n" not in line
    assert "an MPI with mpicc (mpicc), CMake (cmake), make or ninja (make/ninja)" in line
    assert "module load openmpi cmake ninja" in line
    assert "apt-get install libopenmpi-dev openmpi-bin cmake make" in line
    assert "dnf install openmpi-devel (then module load mpi/openmpi-x86_64) cmake make" in line


# ---------------------------------------------------------------- the offline directory


def write_offline_dir(folder: Path, python_tag: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / bi.SDIST_NAME).write_bytes(b"sdist bytes")
    (folder / f"cffi-2.1.1-{python_tag}-{python_tag}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl").write_bytes(b"c")
    (folder / "pycparser-3.0-py3-none-any.whl").write_bytes(b"p")


def test_offline_dir_needs_the_sdist_and_wheels_for_this_python(tmp_path):
    write_offline_dir(tmp_path / "cp312", "cp312")
    assert bi.check_offline_dir(tmp_path / "cp312", (3, 12))[0] == bi.SDIST_NAME
    with pytest.raises(bi.BuildError, match=r"no cffi==2.1.1 wheel for CPython 3.11 .*has cffi-2.1.1-cp312"):
        bi.check_offline_dir(tmp_path / "cp312", (3, 11))
    (tmp_path / "cp312" / bi.SDIST_NAME).unlink()
    with pytest.raises(bi.BuildError, match=f"lacks {bi.SDIST_NAME}"):
        bi.check_offline_dir(tmp_path / "cp312", (3, 12))
    with pytest.raises(bi.BuildError, match="no such directory .*--prepare-offline"):
        bi.check_offline_dir(tmp_path / "absent", (3, 12))


def test_offline_manifest_catches_a_damaged_copy(tmp_path):
    write_offline_dir(tmp_path, "cp312")
    files = bi.check_offline_dir(tmp_path, (3, 12))
    digest = {name: bi._sha256(tmp_path / name) for name in files}
    (tmp_path / bi.OFFLINE_MANIFEST).write_text(f'{{"sha256": {__import__("json").dumps(digest)}}}')
    bi.check_offline_dir(tmp_path, (3, 12))
    (tmp_path / bi.SDIST_NAME).write_bytes(b"sdist byt")  # truncated on the way
    with pytest.raises(bi.BuildError, match="differs from larscale-offline.json"):
        bi.check_offline_dir(tmp_path, (3, 12))


def test_wheel_tags_and_the_download_commands():
    assert bi.wheel_fits("cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 12))
    assert not bi.wheel_fits("cffi-2.1.1-cp312-cp312-manylinux2014_aarch64.whl", (3, 12))
    assert not bi.wheel_fits("cffi-2.1.1-cp311-cp311-manylinux2014_x86_64.whl", (3, 12))
    assert bi.wheel_fits("pycparser-3.0-py3-none-any.whl", (3, 12))
    sdist, wheels = bi.offline_download_commands(Path("/d"), "3.12", ["pip"])
    assert sdist[-1] == "horovod==0.28.1" and "--no-binary" in sdist
    assert wheels[wheels.index("--abi") + 1] == "cp312" and "manylinux2014_x86_64" in wheels
    assert wheels[-2:] == list(bi.OFFLINE_WHEELS)
    with pytest.raises(bi.BuildError, match="--python-version 312"):
        bi.prepare_offline(Path("/never"), "312", ["pip"])


def test_the_prepared_offline_dir_fits_the_gpu_machine(offline_dir):
    files = bi.check_offline_dir(offline_dir, (3, 12))
    assert sum((offline_dir / f).stat().st_size for f in files) < 16 * 2**20   # carried with the tree (64 MiB in all)


# ---------------------------------------------------------------- a system-mode venv


def test_a_venv_made_by_a_venv_python_sees_that_venvs_torch(tmp_path):
    """What /opt/torch/.venv/bin/python3 does on the GPU machine, with this repo's .venv as the parent."""
    import torch

    parent = Path(sys.executable)
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a venv")
    child = tmp_path / "child"
    subprocess.run([str(parent), "-m", "venv", "--system-site-packages", "--without-pip", str(child)], check=True)
    plain = subprocess.run([str(child / "bin" / "python"), "-c", "import torch; print(torch.__file__)"],
                           capture_output=True, text=True)
    # the pitfall: --system-site-packages means the base interpreter's packages, not the parent venv's
    assert plain.returncode != 0 or plain.stdout.strip() != torch.__file__
    subprocess.run([str(parent), "-m", "tools.horovod_build", "link-site", str(child)], check=True, cwd=REPO,
                   capture_output=True)
    seen = subprocess.run([str(child / "bin" / "python"), "-c", "import torch, pip, sys; print(torch.__file__); "
                           "print(sys.prefix)"], capture_output=True, text=True, check=True).stdout.split()
    assert seen == [torch.__file__, str(child)]   # the parent's torch, the child's prefix


def test_missing_requirements_of_a_system_mode_venv(tmp_path):
    names = bi.declared_requirements((REPO / "setup.cfg").read_text(), ["train", "test"])
    assert "torch" in names and "tensorflow-cpu" in names and "pyyaml" in names and "pytest" in names
    assert bi.declared_requirements((REPO / "setup.cfg").read_text(), []) == [
        "numpy", "scipy", "pandas", "pyarrow", "matplotlib", "pyyaml"]
    with pytest.raises(bi.BuildError, match=r"no extra \[gpu\]"):
        bi.declared_requirements((REPO / "setup.cfg").read_text(), ["gpu"])
    assert "torch" not in bi.missing_distributions(names + ["surely-not-installed-larscale-x"])
    assert bi.missing_distributions(["surely-not-installed-larscale-x", "numpy"]) == ["surely-not-installed-larscale-x"]


# ---------------------------------------------------------------- bootstrap.sh itself


@pytest.mark.parametrize("env, culprit", [
    ({"HOROVOD_GPU_OPERATIONS": "NCCL"}, "the pinned torch (constraints.txt) is the CPU build"),
    ({"HOROVOD_GPU_OPERATIONS": "NCCL", "LARSCALE_TORCH": "system", "PYTHON": sys.executable}, "is a CPU build"),
    ({"LARSCALE_TORCH": "conda"}, "LARSCALE_TORCH=conda"),
    ({"LARSCALE_OFFLINE_DIR": "/nonexistent/offline"}, "LARSCALE_OFFLINE_DIR=/nonexistent/offline"),
    ({"PYTHON": "/nonexistent/python3"}, "PYTHON=/nonexistent/python3"),
    ({"LARSCALE_NO_SYSTEM_PACKAGES": "yes"}, "LARSCALE_NO_SYSTEM_PACKAGES=yes: expected 1"),
])
def test_bootstrap_refuses_bad_requests_before_touching_anything(tmp_path, env, culprit):
    if env.get("PYTHON") == sys.executable and hb.probe_cuda(os.environ).torch_cuda:
        pytest.skip("this interpreter's torch has CUDA: an NCCL build is a valid request here")
    venv = tmp_path / "venv"
    proc = subprocess.run(["./bootstrap.sh"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LARSCALE_VENV": str(venv), "LARSCALE_CACHE": str(tmp_path), **env})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], proc.stderr
    assert not venv.exists()


def test_bootstrap_rejects_unknown_arguments():
    proc = subprocess.run(["./bootstrap.sh", "--gpu"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown arguments: --gpu" in proc.stderr
