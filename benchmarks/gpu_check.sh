#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network): build Horovod with NCCL from the carried offline folder,
# run the GPU tests, and time the loops of benchmarks/bench_gpu.py side by side. Meant to finish within 8 minutes
# on an H200 (Horovod's build ~100 s of it).
#
# Before (on a networked machine, once):  ./bootstrap.sh --prepare-offline .cache/offline --python-version 3.12
# Then, from the repo root on the GPU machine, with .cache/offline carried along:
#     benchmarks/gpu_check.sh
# Everything lands in $OUT (default ./gpu_check_out), nine files at most, no deeper than one folder:
#     summary.txt             the machine, every stage's exit status and seconds, and bench_gpu's table
#     bootstrap.log           the Horovod build, then a one-rank NCCL allreduce through horovodrun
#     tests.log               pytest of the GPU tests
#     comm.log, comm_cuda.csv, hvd_cuda.csv   bench-comm and bench-hvd over device memory
#     bench_gpu.log, .json    the rows and ratios (RESULT line; JSON)
#     bench_gpu_runs.tar.gz   the larscale run directories and their logs
# Knobs: PYTHON (a python whose torch has CUDA, default /opt/torch/.venv/bin/python3), LARSCALE_OFFLINE_DIR
# (default .cache/offline), LARSCALE_VENV (default .cache/gpu-venv, ignored by git), GPU_CHECK_BUDGET_S
# (default 480: bench_gpu starts no row that would not fit), GPU_CHECK_BENCH_ARGS (more bench_gpu.py arguments).
# A failing stage is reported and the next one runs anyway; the exit status is 1 when any stage failed.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
started=$(date +%s)
out=$(realpath -m "${OUT:-./gpu_check_out}")
mkdir -p "$out"
export PYTHON=${PYTHON:-/opt/torch/.venv/bin/python3}
export LARSCALE_OFFLINE_DIR=${LARSCALE_OFFLINE_DIR:-$repo/.cache/offline}
export LARSCALE_VENV=${LARSCALE_VENV:-$repo/.cache/gpu-venv}
budget=${GPU_CHECK_BUDGET_S:-480}
venv_python="$LARSCALE_VENV/bin/python"
summary="$out/summary.txt"
failed=0

# stage NAME LOG COMMAND...: run, append the output to LOG, record the exit status and seconds in the summary.
stage() {
    local name=$1 log=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name: $*" >>"$log"
    "$@" >>"$log" 2>&1
    rc=$?
    printf '%-16s exit %-3s %4s s   (log: %s)\n' "$name" "$rc" "$(($(date +%s) - t0))" "$(basename "$log")" | tee -a "$summary"
    ((rc == 0)) || failed=1
    return "$rc"
}

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), $(nproc) cores"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    else
        echo "gpu: no nvidia-smi"
    fi
    "$PYTHON" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>&1
    (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>&1) | grep -i release
    echo "$(c++ --version 2>&1 | head -n 1); $(cmake --version 2>&1 | head -n 1)"
    echo "offline folder: $(ls "$LARSCALE_OFFLINE_DIR" 2>&1 | tr '\n' ' ')"
} >"$summary"
cat "$summary"

# ---- 1. Horovod with NCCL, built against the machine's CUDA torch (the recipe's known-good: Gloo, no MPI) ----
stage build "$out/bootstrap.log" env LARSCALE_TORCH=system HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_WITHOUT_MPI="${HOROVOD_WITHOUT_MPI:-1}" LARSCALE_BOOTSTRAP_QUIET=1 ./bootstrap.sh
if [[ -x "$LARSCALE_VENV/bin/horovodrun" ]]; then
    stage nccl_allreduce "$out/bootstrap.log" "$LARSCALE_VENV/bin/horovodrun" -np 1 -H localhost:1 --gloo \
        "$venv_python" -c '
import torch, horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.full((4,), 2.0, device="cuda"), op=hvd.Sum)
assert hvd.nccl_built(), "Horovod was built without NCCL"
assert torch.equal(total.cpu(), torch.full((4,), 2.0)), total
print(f"nccl_built={hvd.nccl_built()} allreduce on {torch.cuda.get_device_name()}: ok")'
else
    echo "nccl_allreduce   skipped: no horovodrun in $LARSCALE_VENV" | tee -a "$summary"
fi
# Without a venv (the build refused early) the rest still runs on PYTHON: the larscale rows will then fail.
[[ -x "$venv_python" ]] || venv_python=$PYTHON

# ---- 2. the GPU tests: marked `gpu` once setup.cfg registers the marker, else the CUDA tests by name ----------
if grep -Eq '^[[:space:]]+gpu:' setup.cfg; then
    selection=(-m gpu tests)
else
    selection=(tests/test_lars_fast.py -k cuda)
fi
stage tests "$out/tests.log" "$venv_python" -m pytest -q -p no:cacheprovider -rs "${selection[@]}"

# ---- 3. collectives over device memory: bench-comm hands device pointers to the MPI library (2 ranks at least,
# sharing a GPU if need be; refused in one line, exit 2, when the library does not say it is CUDA-aware: reported
# as refused, not as a failure); bench-hvd times NCCL through Horovod, one rank per GPU (NCCL refuses two ranks on
# one GPU), which needs a Horovod built with MPI (HOROVOD_WITHOUT_MPI=0).
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
comm_args=(--max-bytes 64M --factor 4 --repetitions 10 --max-seconds-per-size 2 --timeout 240 --label gpu_check)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1    # the lent machine runs the check as root
before=$failed
stage bench_comm_cuda "$out/comm.log" "$venv_python" -m larscale bench-comm --device cuda "${comm_args[@]}" \
    --ranks $((gpus > 2 ? gpus : 2)) --out "$out/comm_cuda.csv"
if (($? == 2)) && refusal=$(grep -E 'is not GPU-aware|does not say it is GPU-aware' "$out/comm.log" | tail -n 1); then
    failed=$before
    echo "bench_comm_cuda  refused: ${refusal#*error: }" | tee -a "$summary"
fi
if "$venv_python" -c 'import sys, horovod.torch as hvd; sys.exit(0 if hvd.mpi_built() else 3)' 2>/dev/null; then
    stage bench_hvd_cuda "$out/comm.log" "$venv_python" -m larscale bench-hvd --device cuda "${comm_args[@]}" \
        --ranks $((gpus > 1 ? gpus : 1)) --out "$out/hvd_cuda.csv"
else
    echo "bench_hvd_cuda   skipped: no Horovod with MPI in $LARSCALE_VENV (HOROVOD_WITHOUT_MPI=0 builds one)" \
        | tee -a "$summary"
fi
for csv in "$out/comm_cuda.csv" "$out/hvd_cuda.csv"; do    # each operation's largest size, for the summary
    [[ -f $csv ]] && "$venv_python" - "$csv" <<'EOF_ROWS' | tee -a "$summary"
import sys
from larscale.benchformat import read_csv
largest = {row["operation"]: row for row in read_csv(sys.argv[1])}
for op, r in largest.items():
    print(f"{op:<24} {r['bytes']:>9} B  median {r['median_s'] * 1e6:9.1f} us  busbw "
          f"{r['busbw_gbytes_per_s']:7.2f} GB/s  on {r.get('device') or '?'}")
EOF_ROWS
done

# ---- 4. bench_gpu: bare eager / compiled loops, larscale train eager / --compile, the LARS step --------------
# Rows start only while they can finish inside the budget (the longest, a first compile, takes ~100 s).
left=$((budget - ($(date +%s) - started) - 110))
((left > 30)) || left=30
read -r -a bench_args <<<"${GPU_CHECK_BENCH_ARGS:-}"
stage bench_gpu "$out/bench_gpu.log" env PYTHONUNBUFFERED=1 "$venv_python" benchmarks/bench_gpu.py \
    --out "$out/bench_gpu" --json "$out/bench_gpu.json" --deadline-s "$left" "${bench_args[@]}"
sed -n '/^row /,/^RESULT/p' "$out/bench_gpu.log" | grep -v '^RESULT' >>"$summary"
if [[ -d "$out/bench_gpu" ]]; then
    tar -czf "$out/bench_gpu_runs.tar.gz" -C "$out" bench_gpu && rm -rf "$out/bench_gpu"
fi

echo "total $(($(date +%s) - started)) s; $( ((failed)) && echo 'some stage FAILED' || echo 'all stages passed')" \
    | tee -a "$summary"
exit "$failed"
