#!/usr/bin/env bash
# Take a machine with Python 3.11 to a working larscale environment: a fresh Debian machine as root, a cluster
# login node as a user (MPI, compiler and CMake from `module load`), or a conda environment.
#
# Idempotent: every step checks whether its result is already there and skips itself, so a second
# run takes seconds. What it does, in order:
#   0. refuses a bad request (unknown knob value, an NCCL build without CUDA, an incomplete offline
#      directory, and, where it installs no system packages, build tools missing from the PATH) in one line,
#      before anything is installed or built;
#   1. as root on Debian only: Debian packages (Open MPI, Slurm + munge, compilers, headers the Horovod TF
#      build includes). Not as a user, not in a conda environment, not with LARSCALE_NO_SYSTEM_PACKAGES=1:
#      no package manager is run, and mpicc, a C++ compiler, CMake and make must be on the PATH;
#   2. a virtual environment in .venv (or the active conda environment) with the pinned Python stack:
#      requirements.txt (larscale with its [train,test] extras, declared in setup.cfg) + constraints.txt;
#   3. Horovod 0.28.1 from the PyPI sdist, patched to build against torch 2.13 and TensorFlow 2.21, for
#      PyTorch and TensorFlow with the MPI and Gloo controllers; the wheel is cached in .cache/wheels
#      (ignored by git) and in ~/.cache/larscale/wheels so a fresh clone on the same machine reuses it;
#   4. larscale itself, editable, and a check that Horovod has every framework and controller.
# Which patches and build variables apply, where NCCL and CUDA are and the wheel's cache key are decided
# by tools/horovod_build.py (standard library only), which this script calls.
#
# Environment knobs:
#   PYTHON                  interpreter for the venv (default python3)
#   LARSCALE_VENV           the venv's folder (default .venv; inside an active conda environment whose python
#                           is PYTHON, that environment itself: conda env create -f environment.yml first)
#   LARSCALE_NO_SYSTEM_PACKAGES=1  never run apt-get, even as root: use the MPI, compiler and CMake on the PATH
#   PIP_EXTRA_INDEX_URL     pip's own knob: where the pinned torch==2.13.0+cpu is when the index pip uses has only
#                           PyPI's CUDA build (https://download.pytorch.org/whl/cpu; or PIP_FIND_LINKS=a wheel folder)
#   LARSCALE_CACHE          wheel cache shared across clones (default ~/.cache/larscale)
#   LARSCALE_TORCH          pin (default): the CPU torch of constraints.txt; system: the torch PYTHON already
#                           has (a CUDA build, a site module, a container) -- the venv then sees PYTHON's
#                           packages, installs only what they lack, no Debian packages, and Horovod is built
#                           for PyTorch only with Gloo (and MPI when mpicc is on the PATH)
#   HOROVOD_GPU_OPERATIONS  NCCL for the GPU build (needs LARSCALE_TORCH=system with a CUDA torch, and nvcc);
#                           NCCL comes from the torch wheel's nvidia-nccl-* package or HOROVOD_NCCL_HOME, the
#                           compute capability from the local GPU; any HOROVOD_* variable you set wins
#   LARSCALE_OFFLINE_DIR    take the Horovod sdist and the cffi wheels from this folder (no network needed);
#                           make it on a networked machine with
#                               ./bootstrap.sh --prepare-offline DIR [--python-version 3.12]
#   LARSCALE_BOOTSTRAP_QUIET=1  skip the final line of what Horovod was built with
#
# A GPU machine without network, with a CUDA PyTorch in /opt/torch/.venv (see benchmarks/gpu_check.sh):
#   LARSCALE_TORCH=system PYTHON=/opt/torch/.venv/bin/python3 HOROVOD_GPU_OPERATIONS=NCCL \
#       LARSCALE_OFFLINE_DIR=.cache/offline ./bootstrap.sh
set -euo pipefail

log() { printf '[bootstrap] %s\n' "$*" >&2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Paths the caller gave are relative to the caller's directory: made absolute before moving to the repo.
python=${PYTHON:-python3}
if ! python=$(command -v "$python"); then
    log "PYTHON=${PYTHON:-python3}: no such interpreter"
    exit 1
fi
[[ $python == /* ]] || python=$(realpath -s "$python")
venv=$(realpath -m "${LARSCALE_VENV:-$repo/.venv}")
offline=${LARSCALE_OFFLINE_DIR:+$(realpath -m "$LARSCALE_OFFLINE_DIR")}
prepare_dir=
[[ ${1:-} == --prepare-offline && -n ${2:-} ]] && prepare_dir=$(realpath -m "$2")
torch_mode=${LARSCALE_TORCH:-pin}
horovod_version=0.28.1
shared_cache=${LARSCALE_CACHE:-$HOME/.cache/larscale}/wheels
cd "$repo"
build_py() { "$1" -m tools.horovod_build "${@:2}"; }   # the decisions, in Python (stdlib only)
# Inside an active conda environment (environment.yml: its MPI, compilers and CMake) the stack goes into it.
conda_env=
if [[ -z ${LARSCALE_VENV:-} && -n ${CONDA_PREFIX:-} && $python == "$CONDA_PREFIX"/bin/* ]]; then
    conda_env=$CONDA_PREFIX
    venv=$conda_env
fi
# Debian packages only as root on a machine with apt-get, for the pinned stack, outside conda, unless told not to.
system_packages=0
case ${LARSCALE_NO_SYSTEM_PACKAGES:-0} in
    0|"") no_system_packages=0 ;;
    1) no_system_packages=1 ;;
    *) log "LARSCALE_NO_SYSTEM_PACKAGES=$LARSCALE_NO_SYSTEM_PACKAGES: expected 1 (or 0)"; exit 1 ;;
esac
if [[ $torch_mode == pin && $no_system_packages == 0 && -z $conda_env && $(id -u) -eq 0 ]] \
   && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
    system_packages=1
fi

# ---- 0. arguments: only --prepare-offline DIR [--python-version X.Y] ---------------------------
if (($#)); then
    if [[ $1 != --prepare-offline || $# -lt 2 ]]; then
        log "unknown arguments: $* (usage: ./bootstrap.sh [--prepare-offline DIR [--python-version 3.12]])"
        exit 1
    fi
    shift 2
    pyver=()
    if (($#)); then
        if [[ $1 != --python-version || $# -ne 2 ]]; then
            log "unknown arguments: $* (usage: ./bootstrap.sh --prepare-offline DIR [--python-version 3.12])"
            exit 1
        fi
        pyver=(--python-version "$2")
    fi
    # pip downloads for any target Python; use one that has pip (the venv's, else PYTHON).
    with_pip=$python
    [[ -x "$venv/bin/python" ]] && with_pip="$venv/bin/python"
    build_py "$with_pip" prepare-offline "$prepare_dir" "${pyver[@]}"
    exit 0
fi
# Refuse a bad request in one line before anything is installed or built.
check_args=(--mode "$torch_mode")
[[ -n "$offline" ]] && check_args+=(--offline "$offline")
# Without system packages the build tools must already be there (module load, conda): all missing ones in one line.
((system_packages)) || check_args+=(--prerequisites)
build_py "$python" check "${check_args[@]}"

# ---- 1. Debian packages (root on Debian only) --------------------------------------------------
if ((system_packages)); then
    debian_packages=(openmpi-bin libopenmpi-dev cmake g++ make slurm-wlm munge
                     libhighwayhash-dev libfarmhash-dev iproute2 procps)
    missing=()
    for pkg in "${debian_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# ---- 2. virtual environment --------------------------------------------------------------------
# The venv remembers which torch it was made for; a venv of the other kind is never reused silently.
if [[ -n $conda_env ]]; then
    if [[ ! -f "$venv/.larscale-torch" ]]; then
        log "installing into the conda environment $venv (LARSCALE_TORCH=$torch_mode)"
        echo "$torch_mode" >"$venv/.larscale-torch"
    fi
elif [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv (LARSCALE_TORCH=$torch_mode)"
    if [[ $torch_mode == system ]]; then
        # Without pip of its own: PYTHON's pip is visible, and ensurepip is missing on some images.
        "$python" -m venv --system-site-packages --without-pip "$venv"
        build_py "$python" link-site "$venv"
    else
        "$python" -m venv "$venv"
    fi
    echo "$torch_mode" >"$venv/.larscale-torch"
fi
made_for=$(cat "$venv/.larscale-torch" 2>/dev/null || echo pin)
if [[ $made_for != "$torch_mode" ]]; then
    log "$venv was made with LARSCALE_TORCH=$made_for, not $torch_mode: set LARSCALE_VENV to another folder or move it aside"
    exit 1
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# The editable install maps each package to its folder when it is made: a new package in setup.cfg (or a module
# that became a package) needs it made again, so this stamp holds setup.cfg's hash (step 4).
package_stamp="$venv/.larscale-package"
package_want=$(sha256sum setup.cfg | cut -d' ' -f1)
offline_pip=()
[[ -n "$offline" ]] && offline_pip=(--no-index --find-links "$offline")
if [[ $torch_mode == pin ]]; then
    # The stamp holds the hash of the dependency files (setup.cfg declares them, constraints.txt pins them):
    # when one changes, pip runs again. Always with -c constraints.txt: pip never resolves an unpinned torch.
    stamp="$venv/.larscale-requirements"
    want=$(cat requirements.txt constraints.txt setup.cfg | sha256sum | cut -d' ' -f1)
    if [[ ! -f "$stamp" || $(cat "$stamp") != "$want" ]]; then
        log "installing the pinned Python stack (torch is pinned: pip never resolves a CUDA build)"
        "${pip[@]}" install -q --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
        # pip compiles each file to bytecode one at a time: --no-compile, then compileall on every core
        # (half the install's time on 2 cores; the files are the same).
        if ! "${pip[@]}" install -q --no-compile -r requirements.txt -c constraints.txt; then
            log "pip could not install the pinned stack; if it found no torch==2.13.0+cpu (PyPI has only the CUDA" \
                "build), give it PyTorch's CPU wheels: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./bootstrap.sh"
            exit 1
        fi
        "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c \
            'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
        echo "$want" >"$stamp"
        echo "$package_want" >"$package_stamp"   # requirements.txt installed larscale itself, editable
    fi
else
    if ! "${pip[@]}" --version >/dev/null 2>&1; then
        log "LARSCALE_TORCH=system: $python has no pip, and the venv takes PYTHON's"
        exit 1
    fi
    # Only what PYTHON's packages lack, unpinned: pins would replace the packages its torch was built with.
    lacking_names=$(build_py "$venv/bin/python" missing setup.cfg --extras train,test)
    read -r -a lacking <<<"$lacking_names"
    if ((${#lacking[@]})); then
        log "installing what $python lacks: ${lacking[*]}"
        "${pip[@]}" install -q "${offline_pip[@]}" "${lacking[@]}" \
            || { log "could not install ${lacking[*]}${offline:+ from $offline}"; exit 1; }
    fi
fi

# ---- 3. Horovod, patched, built once and cached ------------------------------------------------
horovod_ok() {
    # Every framework and controller asked for must be there; anything less is rebuilt. "$@": --report.
    TF_CPP_MIN_LOG_LEVEL=3 TF_USE_LEGACY_KERAS=1 build_py "$venv/bin/python" verify --mode "$torch_mode" "$@"
}
report=(--report)
[[ -n "${LARSCALE_BOOTSTRAP_QUIET:-}" ]] && report=()
# One check (it imports Horovod and TensorFlow, seconds): when it passes, its line is said at the end.
built_with=
if verified=$(horovod_ok "${report[@]}" 2>&1); then
    built_with=$(grep '^\[horovod_build\]' <<<"$verified" || true)
else
    # The wheel links against this torch (and TensorFlow): their versions, the GPU variant and the
    # controllers are part of the cache key.
    plan=$(build_py "$venv/bin/python" plan --mode "$torch_mode" --link-dir "$venv/larscale-nccl")
    key=$(sed -n 's/^LARSCALE_WHEEL_KEY=//p' <<<"$plan")
    local_cache="$repo/.cache/wheels/$key"
    wheel=$(ls "$local_cache"/horovod-"$horovod_version"-*.whl "$shared_cache/$key"/horovod-"$horovod_version"-*.whl \
            2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        build=$(mktemp -d)
        log "building Horovod $horovod_version ($key, ~5 min on 2 cores) in $build"
        if [[ -n "$offline" ]]; then
            cp "$offline/horovod-$horovod_version.tar.gz" "$build/"
            # setup.py wants cffi at build time; offline, setuptools cannot fetch it.
            if ! "$venv/bin/python" -c 'import cffi' 2>/dev/null; then
                "${pip[@]}" install -q "${offline_pip[@]}" cffi pycparser
            fi
        else
            "${pip[@]}" download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$build"
        fi
        tar -xzf "$build/horovod-$horovod_version.tar.gz" -C "$build"
        src="$build/horovod-$horovod_version"
        # Each patch is applied where this build needs it and checked; a changed sdist stops the build.
        build_py "$venv/bin/python" patch "$src" --mode "$torch_mode"
        (
            cd "$src"
            eval "$plan"
            "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$local_cache" .
        )
        rm -rf "$build"
        wheel=$(ls "$local_cache"/horovod-"$horovod_version"-*.whl | head -n 1)
    fi
    mkdir -p "$local_cache" "$shared_cache/$key"
    cp -n "$wheel" "$local_cache/" 2>/dev/null || true
    cp -n "$wheel" "$shared_cache/$key/" 2>/dev/null || true
    log "installing $(basename "$wheel")"
    "${pip[@]}" install -q --no-deps --force-reinstall "$wheel"
    # Horovod's runtime needs (cloudpickle, psutil, pyyaml, packaging) are in setup.cfg's [train] extra.
    horovod_ok "${report[@]}" || { log "Horovod installed but lacks a framework or controller"; exit 1; }
fi

# ---- 4. larscale itself -------------------------------------------------------------------------
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("larscale")' >/dev/null 2>&1 \
   || [[ ! -x "$venv/bin/larscale" ]] || [[ ! -f "$package_stamp" || $(cat "$package_stamp") != "$package_want" ]]; then
    log "installing larscale (editable)"
    "${pip[@]}" install -q --no-deps --no-build-isolation -e .
    echo "$package_want" >"$package_stamp"
fi
# The project's own bytecode: where PYTHONDONTWRITEBYTECODE is set (as on some CI hosts) nothing writes it, and
# every rank of every run would compile the same sources again at start-up (~50 ms a trainer). Stale files are
# recompiled by Python itself, so an edit after this is still seen.
"$venv/bin/python" -m compileall -q -j 0 larscale models scaling jobs analysis tools >/dev/null 2>&1 || true
# What Horovod was built with, in one line (`horovodrun --check-build` lists the same, at three times the cost).
[[ -n "$built_with" ]] && echo "$built_with" >&2
log "ready: $venv"
