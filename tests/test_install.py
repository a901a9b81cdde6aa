"""Installing where users are, as a real unprivileged user (made here with useradd, removed at the end).

- A laptop that only plans: a fresh venv and ``pip install`` of a copy of this checkout, with no torch, TensorFlow or
  Horovod; the planning commands work, a training command says in one line what to install.
- A cluster login node: bootstrap.sh as that user on a module-like python that has torch and TensorFlow, with MPI
  and compilers on the PATH (as ``module load`` gives) and no package manager on it: Horovod for that torch and MPI
  (here the cached wheel of the root bootstrap's identical build: nothing is compiled), and the venv trains 1 and
  2 ranks; the laptop install collects that sweep and reports on it. bootstrap.sh also names every missing build
  tool in one line.

The user owns a copy of the checkout (tracked and untracked files, not .venv or .cache) in a folder of its own.
pip's cache for the user lives in .cache/install-test (ignored by git) and is kept between runs.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tools import horovod_build as hb
from tools.build_inputs import site_link_text

pytestmark = pytest.mark.slow

SYSTEM_PATH = "/usr/bin:/bin"
SBIN = "/usr/sbin:/sbin:" + SYSTEM_PATH
# What bootstrap.sh must never run without root: traps with these names record any call.
PACKAGE_MANAGERS = ("apt", "apt-get", "apt-cache", "aptitude", "dpkg", "dpkg-query", "dnf", "yum", "rpm", "zypper",
                    "sudo", "su", "conda", "mamba")
STACK = ("torch", "tensorflow", "horovod", "mpi4py", "tools")
# The smallest sweep `larscale report` takes: a model it has tables for, 1 and 2 ranks (fit on one, predict the other).
SMALL_SWEEP = """\
name: small
model: resnet50
framework: torch
dataset: synthetic
machine: local
sweep: {kind: weak, nodes: [1], ranks_per_node: [1, 2], batch_per_rank: 2, threads_per_rank: 1}
training: {steps: 4, optimizer: lars, lr: 0.1, lr_scaling: linear, base_batch: 4, image_size: 32, num_classes: 10,
           extra_args: ["--no-eval"]}
job: {walltime: "00:10:00"}
"""


@dataclass
class User:
    """An unprivileged user with a home folder of its own and a copy of the checkout in it."""

    name: str
    home: Path
    checkout: Path
    python: str          # an interpreter that user can run (not root's)
    pip_cache: Path

    def env(self, path: str = SYSTEM_PATH, **extra: str) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": path, "LANG": "C.UTF-8",
                "PIP_CACHE_DIR": str(self.pip_cache), "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
                **extra}

    def run(self, argv: list[str], cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``argv`` as this user, with only ``env`` (default: ``self.env()``) in its environment."""
        runuser = shutil.which("runuser", path=SBIN)
        assignments = [f"{k}={v}" for k, v in (env or self.env()).items()]
        return subprocess.run([runuser, "-u", self.name, "--", "env", "-i", *assignments, *argv],
                              cwd=cwd or self.home, capture_output=True, text=True, timeout=timeout)


def _user_python() -> str | None:
    """A python3 of this interpreter's minor version outside root's home (the cached Horovod wheel is for it)."""
    wanted = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for name in (f"python{wanted}", "python3"):
        found = shutil.which(name, path=SYSTEM_PATH)
        if found:
            out = subprocess.run([found, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() == wanted:
                return found
    return None


def _copy_checkout(dest: Path) -> None:
    """The files git knows or would add (tracked and untracked, not ignored): the working tree as a user has it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def _end_processes_of(uid: int) -> None:
    for proc in psutil.process_iter(["pid", "uids"]):
        if proc.info["uids"] and proc.info["uids"].real == uid:
            proc.kill()


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    if os.geteuid() != 0:
        pytest.skip("making a test user needs root (useradd)")
    missing = [t for t in ("useradd", "userdel", "runuser") if shutil.which(t, path=SBIN) is None]
    python = _user_python()
    if missing or python is None:
        pytest.skip(f"needs {', '.join(missing) or f'a python{sys.version_info[0]}.{sys.version_info[1]} with venv'}"
                    " outside root's home")
    name = f"lsinst{os.getpid() % 100000}"
    home = Path(tempfile.mkdtemp(prefix="larscale-install-", dir="/tmp"))
    subprocess.run([shutil.which("useradd", path=SBIN), "--home-dir", str(home), "--no-create-home",
                    "--shell", "/bin/bash", "--user-group", name], check=True, capture_output=True)
    entry = pwd.getpwnam(name)
    pip_cache = REPO / ".cache" / "install-test" / "pip"
    try:
        pip_cache.mkdir(parents=True, exist_ok=True)
        _copy_checkout(home / "checkout")
        for path in (home, pip_cache):
            subprocess.run(["chown", "-R", f"{entry.pw_uid}:{entry.pw_gid}", str(path)], check=True)
        yield User(name, home, home / "checkout", python, pip_cache)
    finally:
        _end_processes_of(entry.pw_uid)
        subprocess.run([shutil.which("userdel", path=SBIN), name], capture_output=True)
        subprocess.run(["chown", "-R", "0:0", str(pip_cache)], capture_output=True)   # kept for the next run
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def laptop(user: User) -> Path:
    """The planning-only install: a fresh venv and `pip install` of the user's checkout; returns its bin folder."""
    venv = user.home / "laptop"
    made = user.run([user.python, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    # --no-compile: the byte-compiling of every installed module is 2/3 of the install's CPU; only what runs is
    # compiled then (nothing else differs from a user's `pip install .`)
    installed = user.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                          str(user.checkout)], timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv / "bin"


def path_without_package_managers(user: User, leave_out: tuple[str, ...] = ()) -> tuple[str, Path]:
    """A PATH folder with every command of /usr/bin except the package managers (and ``leave_out``), and a trap
    for each package manager that records its call; returns the PATH and the record's file."""
    folder = Path(tempfile.mkdtemp(prefix="bin-", dir=user.home))
    record = user.home / "package-manager-calls"
    for entry in Path("/usr/bin").iterdir():
        if entry.name not in PACKAGE_MANAGERS and entry.name not in leave_out:
            (folder / entry.name).symlink_to(entry)
    for name in PACKAGE_MANAGERS:
        (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {record}\nexit 1\n')
        (folder / name).chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(folder)], check=True)
    return str(folder), record


def test_bootstrap_names_every_missing_build_tool_in_one_line(user: User) -> None:
    path, record = path_without_package_managers(user, leave_out=("mpicc", "cmake"))
    # an interpreter in a folder of its own: pip's cmake beside the interpreter would count (/usr/bin has cmake)
    python = user.home / "bare-python"
    assert user.run([user.python, "-m", "venv", "--without-pip", str(python)]).returncode == 0
    venv = user.home / "never-made"
    proc = user.run(["./bootstrap.sh"], cwd=user.checkout,
                    env=user.env(path, PYTHON=str(python / "bin" / "python"), LARSCALE_VENV=str(venv)))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for expected in ("an MPI with mpicc", "CMake", "module load openmpi cmake", "apt-get install libopenmpi-dev",
                     "dnf install openmpi-devel"):
        assert expected in lines[0], lines[0]
    assert "C++ compiler" not in lines[0] and "make or ninja" not in lines[0]   # those are on the PATH
    assert not venv.exists() and not record.exists()


def test_laptop_install_plans_without_the_training_stack(user: User, laptop: Path) -> None:
    py = str(laptop / "python")
    found = user.run([py, "-c", f"import importlib.util as u; print([m for m in {STACK!r} if u.find_spec(m)])"])
    assert found.stdout.strip() == "[]", found            # no torch, TensorFlow, Horovod, mpi4py; no build tools
    larscale = str(laptop / "larscale")
    version = user.run([larscale, "--version"])
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert version.returncode == 0 and version.stdout.strip() == f"larscale {config['metadata']['version']}", version
    predict = user.run([larscale, "predict", "--model", "resnet50", "--machine", "stampede2-knl", "--nodes", "64",
                        "128", "--global-batch", "32768", "--epochs", "90", "--format", "json"])
    assert predict.returncode == 0, predict.stderr
    assert "time_to_train_s" in predict.stdout
    plan = user.run([larscale, "plan", "--model", "resnet50", "--machine", "stampede2-knl", "--target-top1", "74.9",
                     "--budget-node-hours", "5000", "--max-walltime", "12:00:00"])
    assert plan.returncode == 0, plan.stderr
    reproduce = user.run([larscale, "reproduce", "--out", str(user.home / "seed")])
    assert reproduce.returncode == 0, reproduce.stderr
    assert any((user.home / "seed").iterdir())
    sweep = user.run([larscale, "sweep", "plan", str(user.checkout / "jobs" / "examples" / "resnet50-knl-strong.yaml")])
    assert sweep.returncode == 0, sweep.stderr
    for command in ("time-to-accuracy", "calibrate", "report"):    # report runs on a real sweep below
        helped = user.run([larscale, command, "--help"])
        assert helped.returncode == 0, helped.stderr
    # what needs the training stack says so in one line, with the install command, before anything runs
    train = ["train", "--model", "tiny", "--steps", "1", "--out", str(user.home / "run")]
    for argv in ([larscale, *train], [larscale, "smoke"], [larscale, "demo", "--quick", "--out", str(user.home / "r")],
                 [py, "-m", "scaling.train", *train[1:]]):      # the last: what a job script's ranks run
        proc = user.run(argv)
        assert proc.returncode == 2, proc
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "needs torch" in proc.stderr and "pip install 'larscale[train]'" in proc.stderr, proc.stderr
    assert not (user.home / "r").exists()                       # the demo stopped before writing its report


def site_module_python(user: User) -> str:
    """A python like a cluster's PyTorch module, for the user: a venv of its own that sees this test run's torch,
    TensorFlow and the rest of the pinned stack (through a folder of links to them), without their Horovod or
    larscale. Returns its interpreter."""
    source = Path(sysconfig.get_paths()["purelib"])
    folder = user.home / "site-module"
    packages = folder / "packages"
    packages.mkdir(parents=True)
    for entry in source.iterdir():
        if not entry.name.lower().startswith(("horovod", "larscale", "__editable__")):
            (packages / entry.name).symlink_to(entry)
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(folder)], check=True)
    made = user.run([user.python, "-m", "venv", "--without-pip", str(folder / "venv")])
    assert made.returncode == 0, made.stderr
    link = user.run([str(folder / "venv" / "bin" / "python"), "-c", "import sys, sysconfig; from pathlib import Path; "
                     "Path(sysconfig.get_paths()['purelib'], 'site-module.pth').write_text(sys.argv[1])",
                     site_link_text([str(packages)])])
    assert link.returncode == 0, link.stderr
    return str(folder / "venv" / "bin" / "python")


def test_bootstrap_without_root_builds_on_the_site_torch_and_trains_two_ranks(user: User, laptop: Path) -> None:
    """bootstrap.sh as the user on a module-like python (LARSCALE_TORCH=system): no package manager, MPI and
    compilers from the PATH, Horovod for PyTorch and TensorFlow with MPI (the root build's variant, so its cached
    wheel is taken); the venv trains 2 ranks under mpirun, and the laptop install collects the sweep."""
    key = hb.cache_key(hb.probe_interpreter(), hb.make_request("pin", {}, mpicc="mpicc"))
    cached = sorted((REPO / ".cache" / "wheels" / key).glob("horovod-*.whl")) or sorted(
        (Path(os.environ.get("LARSCALE_CACHE", Path.home() / ".cache" / "larscale")) / "wheels" / key).glob(
            "horovod-*.whl"))
    assert cached, f"no cached Horovod wheel for {key}: ./bootstrap.sh (as root) builds it"
    user_cache = user.home / "cache"
    (user_cache / "wheels" / key).mkdir(parents=True)
    shutil.copy2(cached[0], user_cache / "wheels" / key)
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(user_cache)], check=True)
    path, record = path_without_package_managers(user)

    env = user.env(path, PYTHON=site_module_python(user), LARSCALE_TORCH="system", HOROVOD_WITH_TENSORFLOW="1",
                   LARSCALE_CACHE=str(user_cache), LARSCALE_BOOTSTRAP_QUIET="1")
    proc = user.run(["./bootstrap.sh"], cwd=user.checkout, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not record.exists(), record.read_text()                    # no package manager was called
    assert "Debian packages" not in proc.stderr and "building Horovod" not in proc.stderr, proc.stderr
    assert f"installing {cached[0].name}" in proc.stderr, proc.stderr
    venv_bin = user.checkout / ".venv" / "bin"
    where = user.run([str(venv_bin / "python"), "-c", "import horovod, larscale; print(horovod.__file__); "
                      "print(larscale.__file__)"], env=env)
    assert where.stdout.split() == [str(user.checkout / ".venv" / f"lib/python{sys.version_info[0]}."
                                        f"{sys.version_info[1]}/site-packages/horovod/__init__.py"),
                                    str(user.checkout / "larscale" / "__init__.py")], where

    # the venv trains real ranks (Open MPI from the PATH, Horovod's MPI controller): a 1- and a 2-rank sweep point
    (user.home / "small.yaml").write_text(SMALL_SWEEP)
    submit = user.run([str(venv_bin / "larscale"), "sweep", "submit", "small.yaml", "--scheduler", "local"], env=env)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    sweep = user.home / "runs" / "small"
    ranks = sorted(json.loads(p.read_text())["ranks"] for p in sweep.rglob("summary.json"))
    assert ranks == [1, 2], ranks
    # the laptop install (no training stack) collects what the training venv ran, and reports on it
    laptop_larscale = str(laptop / "larscale")
    collect = user.run([laptop_larscale, "sweep", "collect", str(sweep), "--strict"])
    assert collect.returncode == 0, collect.stderr
    assert "n1-p2-b4" in (sweep / "results.csv").read_text()
    report = user.run([laptop_larscale, "report", str(sweep), "--out", str(user.home / "report")])
    assert report.returncode == 0, report.stderr
    assert (user.home / "report" / "index.md").is_file() and (user.home / "report" / "summary.json").is_file()
    # the test suite run by that user skips the Slurm tests (no root, no Slurm here) and says why
    slurm = user.run([str(venv_bin / "python"), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                      "tests/test_jobs_slurm.py"], cwd=user.checkout, env=env)
    assert slurm.returncode == 0, slurm.stdout[-3000:]
    assert "no Slurm can be started without root" in slurm.stdout and "failed" not in slurm.stdout, slurm.stdout
