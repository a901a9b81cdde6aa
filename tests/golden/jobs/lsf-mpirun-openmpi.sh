#!/bin/bash
#BSUB -J ls-golden-n2-p4-b256
#BSUB -n 4
#BSUB -R "span[ptile=2]"
#BSUB -W 1:30
#BSUB -wa USR1
#BSUB -wt 2
#BSUB -o logs/%J.out
#BSUB -P A-ccsc
#BSUB -q normal
#BSUB -sla debug
# larscale sweep golden: 1 run(s) on 2 node(s), lsf/mpirun (stampede2-knl)
set -u
cd -- /scratch/sweeps/golden || exit 1
mkdir -p status logs
# machine profile setup
module load intel impi
export OMP_NUM_THREADS=16
export TF_USE_LEGACY_KERAS=1
export PYTHONUNBUFFERED=1
export HOROVOD_FUSION_THRESHOLD=67108864
larscale_pid=""
larscale_stop=0
larscale_status=0
# The scheduler's pre-timeout signal (or PBS's SIGTERM) asks the running trainer to checkpoint and stop.
larscale_forward() {
  larscale_stop=1
  if [ -n "$larscale_pid" ]; then kill -s USR1 "$larscale_pid" 2>/dev/null || true; fi
}
trap larscale_forward USR1 TERM
# larscale_run POINT_ID COMMAND...: run in the background so traps fire at once, then record its exit status.
larscale_run() {
  local point=$1 status next
  shift
  printf '%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "status/$point.started"
  "$@" &
  larscale_pid=$!
  wait "$larscale_pid"; status=$?
  # A trapped signal interrupts `wait` (status > 128) while the launcher still runs: wait for it again.
  while [ "$status" -gt 128 ] && [ "$larscale_stop" = 1 ]; do
    wait "$larscale_pid"; next=$?
    [ "$next" -eq 127 ] && break
    status=$next
  done
  larscale_pid=""
  printf '%s\n' "$status" > "status/$point.exit"
  if [ "$status" -ne 0 ] && [ "$larscale_status" -eq 0 ]; then larscale_status=$status; fi
  if [ "$status" -eq 75 ]; then larscale_status=75; larscale_stop=1; fi
}
# n2-p4-b256: 2 node(s) x 2 rank(s), global batch 256 (64 per rank), walltime 01:30:00
larscale_argv=(mpirun -np 4 --map-by ppr:2:node:PE=16 --bind-to core -x OMP_NUM_THREADS -x TF_USE_LEGACY_KERAS -x PYTHONUNBUFFERED -x HOROVOD_FUSION_THRESHOLD /opt/py/bin/python -m scaling.train --model resnet50 --framework torch --dataset synthetic --global-batch 256 --steps 50 --optimizer lars --lr 4 --warmup-steps 5 --image-size 64 --checkpoint-every 10 --device cpu --precision fp32 --threads 16 --seed 0 --out /scratch/sweeps/golden/runs/n2-p4-b256)
if [ "$larscale_stop" = 0 ]; then larscale_run n2-p4-b256 "${larscale_argv[@]}"; fi
exit "$larscale_status"
