#!/bin/bash
#SBATCH --job-name=ls-gpu-n2-p4-b256
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --signal=B:USR1@90
#SBATCH --output=logs/%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --account=proj1
#SBATCH --partition=icx
# larscale sweep gpu: 1 run(s) on 2 node(s), slurm/ibrun (stampede3-icx)
set -u
cd -- /scratch/sweeps/gpu || exit 1
mkdir -p status logs
export OMP_NUM_THREADS=1
export TF_USE_LEGACY_KERAS=1
export PYTHONUNBUFFERED=1
# A failed run is relaunched in this job (job.max_retries, job.retry_backoff_s); SIGUSR1 asks ibrun's ranks to checkpoint and stop.
larscale_max_retries=2
larscale_backoff_s=5
larscale_signal=USR1
larscale_pid=""
larscale_rc=0
larscale_stop=0
larscale_status=0
# This job in the attempt records: the scheduler's job id (LARSCALE_JOB_ID for local runs).
larscale_job=${SLURM_JOB_ID:-${PBS_JOBID:-${LSB_JOBID:-${LARSCALE_JOB_ID:-local-$$}}}}
larscale_job=${larscale_job//[^A-Za-z0-9._-]/_}
# The scheduler's pre-timeout signal (or PBS's SIGTERM) asks the running trainer to checkpoint and stop.
larscale_forward() {
  larscale_stop=1
  if [ -n "$larscale_pid" ]; then kill -s "$larscale_signal" "$larscale_pid" 2>/dev/null || true; fi
}
trap larscale_forward USR1 TERM
# larscale_launch COMMAND...: run in the background so traps fire at once; its exit status goes to larscale_rc.
larscale_launch() {
  local next
  "$@" &
  larscale_pid=$!
  wait "$larscale_pid"; larscale_rc=$?
  # A trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait for it again.
  while [ "$larscale_rc" -gt 128 ] && [ "$larscale_stop" = 1 ]; do
    wait "$larscale_pid"; next=$?
    [ "$next" -eq 127 ] && break
    larscale_rc=$next
  done
  larscale_pid=""
}
# larscale_progress RUN_DIR: larscale_steps = steps done by the furthest rank (the last line of its step log),
# larscale_ckpt = the newest checkpoint's step (-1: none) and larscale_ckpt_time = when it was written.
larscale_progress() {
  local log last newest
  larscale_steps=0 larscale_ckpt=-1 larscale_ckpt_time=0
  for log in "$1"/steps/rank-*.jsonl; do
    last=$(tail -n 1 "$log" 2>/dev/null | sed -n 's/.*"step": *\([0-9][0-9]*\).*/\1/p')
    if [ -n "$last" ] && [ "$last" -ge "$larscale_steps" ]; then larscale_steps=$((last + 1)); fi
  done
  newest=$(ls "$1/checkpoints" 2>/dev/null | sed -n 's/^ckpt-\([0-9]\{8\}\)\.pt$/\1/p' | sort | tail -n 1)
  if [ -n "$newest" ]; then
    larscale_ckpt=$((10#$newest))
    larscale_ckpt_time=$(stat -c %.9Y "$1/checkpoints/ckpt-$newest.pt" 2>/dev/null)
    case $larscale_ckpt_time in  # coreutils without %.9Y: whole seconds
      '' | *[!0-9.]*) larscale_ckpt_time=$(stat -c %Y "$1/checkpoints/ckpt-$newest.pt" 2>/dev/null || echo 0) ;;
    esac
  fi
}
# larscale_run POINT RUN_DIR new|resume COMMAND...: run one point, one line per attempt start and end in
# status/POINT.attempts.jsonl. A failed attempt (a rank died or hung: any exit status but 0, 75 = stopped with a
# checkpoint, 2 = usage error, 126/127 = not runnable) is relaunched with --resume after the back-off, up to
# larscale_max_retries times, while each attempt gets further than the one before.
larscale_run() {
  local point=$1 run_dir=$2 mode=$3 records="status/$1.attempts.jsonl"
  local attempt retries=0 reached=-1 requeue=false why="" rc=0 line
  shift 3
  if [ "$(cat "status/$point.exit" 2>/dev/null)" = 0 ] &&
     grep -Eqs '"status": *"complete"' "$run_dir/summary.json"; then
    echo "larscale: $point is complete: not run again" >&2
    return 0
  fi
  rm -f "status/$point.exit"
  if [ -s "$records" ]; then
    mode=resume  # launched before (a resubmission, or this job requeued): continue from its newest checkpoint
    if grep -qF "\"job\": \"$larscale_job\"" "$records"; then requeue=true; fi
  fi
  attempt=$(cat "$records" 2>/dev/null | grep -c '"event": "start"')
  printf '%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "status/$point.started"
  while :; do
    attempt=$((attempt + 1))
    printf '{"event": "start", "attempt": %d, "job": "%s", "mode": "%s", "requeue": %s, "time": %s}\n' \
      "$attempt" "$larscale_job" "$mode" "$requeue" "$(date +%s.%N)" >> "$records"
    if [ "$mode" = resume ]; then larscale_launch "$@" --resume; else larscale_launch "$@"; fi
    rc=$larscale_rc
    if [ "$larscale_stop" = 1 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 75 ] && [ "$run_dir/summary.json" -nt "$records" ] &&
       grep -Eqs '"status": *"interrupted"' "$run_dir/summary.json"; then
      rc=75  # the ranks checkpointed and stopped; the launcher (torchrun) reported the signal as a failure
    fi
    larscale_progress "$run_dir"
    case $rc in
      0|75) ;;
      2) why="exit 2 is a usage error: not retried" ;;
      126|127) why="exit $rc, the command could not run: not retried" ;;
      *) if [ "$larscale_stop" = 1 ]; then why="stopped by the scheduler's signal: not retried"
         elif [ "$retries" -ge "$larscale_max_retries" ]; then
           why="failed $((retries + 1)) times in this job (job.max_retries $larscale_max_retries): not retried"
         elif [ "$larscale_steps" -le "$reached" ]; then
           why="no progress: failed at step $larscale_steps, no further than attempt $((attempt - 1)): not retried"
         fi ;;
    esac
    line=$(printf '{"event": "end", "attempt": %d, "job": "%s", "exit": %d, "steps": %d, ' \
      "$attempt" "$larscale_job" "$rc" "$larscale_steps")
    printf '%s"checkpoint": %d, "checkpoint_time": %s, "time": %s, "why": "%s"}\n' \
      "$line" "$larscale_ckpt" "$larscale_ckpt_time" "$(date +%s.%N)" "$why" >> "$records"
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 75 ] || [ -n "$why" ]; then break; fi
    retries=$((retries + 1)) reached=$larscale_steps mode=resume requeue=false
    echo "larscale: $point: attempt $attempt exited $rc at step $larscale_steps; retry $retries of" \
      "$larscale_max_retries in $larscale_backoff_s s from checkpoint step $larscale_ckpt" >&2
    larscale_launch sleep "$larscale_backoff_s"
    if [ "$larscale_stop" = 1 ]; then why="stopped by the scheduler's signal before retrying"; break; fi
  done
  if [ -n "$why" ]; then echo "larscale: $point: attempt $attempt exited $rc: $why" >&2; fi
  printf '%s\n' "$rc" > "status/$point.exit"
  if [ "$rc" -ne 0 ] && [ "$larscale_status" -eq 0 ]; then larscale_status=$rc; fi
  if [ "$rc" -eq 75 ]; then larscale_status=75; larscale_stop=1; fi
}
# n2-p4-b256: 2 node(s) x 2 rank(s), global batch 256 (64 per rank), walltime 00:30:00
larscale_argv=(ibrun -n 4 -o 0 /opt/py/bin/python -m scaling.train --model resnet50 --framework torch --dataset synthetic --global-batch 256 --steps 50 --optimizer lars --lr 4 --warmup-steps 5 --image-size 64 --checkpoint-every 10 --device cpu --precision fp32 --threads 1 --seed 0 --out /scratch/sweeps/gpu/runs/n2-p4-b256)
if [ "$larscale_stop" = 0 ]; then larscale_run n2-p4-b256 /scratch/sweeps/gpu/runs/n2-p4-b256 new "${larscale_argv[@]}"; fi
exit "$larscale_status"
