#!/usr/bin/env bash
# Take a fresh Debian machine with Python 3.11 (as root) to a working larscale environment.
#
# Idempotent: every step checks whether its result is already there and skips itself, so a second
# run takes seconds. What it does, in order:
#   1. Debian packages (Open MPI, Slurm + munge, compilers, headers the Horovod TF build includes);
#   2. a virtual environment in .venv with the pinned Python stack (requirements.txt + constraints.txt);
#   3. Horovod 0.28.1 from the PyPI sdist, patched to build against torch 2.13 and TensorFlow 2.21, for
#      PyTorch and TensorFlow with the MPI and Gloo controllers; the wheel is cached in .cache/wheels
#      (ignored by git) and in ~/.cache/larscale/wheels so a fresh clone on the same machine reuses it;
#   4. larscale itself, editable, and a check that Horovod has every framework and controller.
#
# Environment knobs: PYTHON (interpreter for the venv, default python3), LARSCALE_CACHE (wheel cache
# shared across clones, default ~/.cache/larscale), HOROVOD_GPU_OPERATIONS=NCCL for a CUDA build.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$repo"
python=${PYTHON:-python3}
venv="$repo/.venv"
horovod_version=0.28.1
shared_cache=${LARSCALE_CACHE:-$HOME/.cache/larscale}/wheels
log() { printf '[bootstrap] %s\n' "$*" >&2; }

# ---- 1. Debian packages ------------------------------------------------------------------------
debian_packages=(openmpi-bin libopenmpi-dev cmake g++ make slurm-wlm munge
                 libhighwayhash-dev libfarmhash-dev iproute2 procps)
missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]} (run this script as root, or install them first)"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. virtual environment with the pinned stack ----------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# The stamp holds the hash of the two pin files: when they change, pip runs again.
stamp="$venv/.larscale-requirements"
want=$(cat requirements.txt constraints.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || $(cat "$stamp") != "$want" ]]; then
    log "installing the pinned Python stack (torch is pinned: pip never resolves a CUDA build)"
    "${pip[@]}" install -q --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
    "${pip[@]}" install -q -r requirements.txt -c constraints.txt
    echo "$want" >"$stamp"
fi

# ---- 3. Horovod, patched, built once and cached ------------------------------------------------
horovod_ok() {
    # Every framework and controller we ship must be there; anything less is rebuilt.
    "$venv/bin/python" - <<'EOF' 2>/dev/null
import horovod.torch as ht, horovod.tensorflow as hf
assert ht.mpi_built() and ht.gloo_built() and hf.mpi_built() and hf.gloo_built()
EOF
}
if ! horovod_ok; then
    # The wheel links against this torch and TensorFlow: their versions are part of the cache key.
    key=$("$venv/bin/python" -c "import sys, importlib.metadata as m; v = sys.version_info; print(f'py{v[0]}{v[1]}-torch{m.version(sys.argv[1])}-tf{m.version(sys.argv[2])}')" torch tensorflow-cpu)
    key+="-${HOROVOD_GPU_OPERATIONS:-cpu}"
    local_cache="$repo/.cache/wheels/$key"
    wheel=$(ls "$local_cache"/horovod-"$horovod_version"-*.whl "$shared_cache/$key"/horovod-"$horovod_version"-*.whl \
            2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        build=$(mktemp -d)
        log "building Horovod $horovod_version for PyTorch + TensorFlow, MPI + Gloo (~5 min) in $build"
        "${pip[@]}" download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$build"
        tar -xzf "$build/horovod-$horovod_version.tar.gz" -C "$build"
        src="$build/horovod-$horovod_version"
        # Patch 1: torch >= 2.1 headers need C++17; the release asks for C++14 (fixed upstream, unreleased).
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        # Patch 2: TF 2.21 moved the XLA headers, so the optional XLA-op integration no longer compiles.
        # Leaving it out of the sources loses only HOROVOD_ENABLE_XLA_OPS, which we do not use.
        sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"   # fail loudly if the sdist changed
        ! grep -q 'xla_mpi_ops.cc' "$src/horovod/tensorflow/CMakeLists.txt"
        (
            cd "$src"
            export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
            export HOROVOD_WITHOUT_MXNET=1 HOROVOD_CMAKE=cmake MAKEFLAGS="-j$(nproc)"
            export TF_USE_LEGACY_KERAS=1
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
    # Horovod's runtime needs (cloudpickle, psutil, pyyaml, packaging) are pinned in requirements.txt.
    horovod_ok || { log "Horovod installed but lacks a framework or controller"; exit 1; }
fi

# ---- 4. larscale itself -------------------------------------------------------------------------
if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("larscale")' >/dev/null 2>&1 \
   || [[ ! -x "$venv/bin/larscale" ]]; then
    log "installing larscale (editable)"
    "${pip[@]}" install -q --no-deps --no-build-isolation -e .
fi
if [[ -z "${LARSCALE_BOOTSTRAP_QUIET:-}" ]]; then
    TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/horovodrun" --check-build 2>/dev/null | sed -n '/Available Frameworks/,$p' >&2
fi
log "ready: $venv"
