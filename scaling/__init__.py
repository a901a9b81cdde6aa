"""What runs under MPI: Horovod training, LARS, schedules, data, checkpoints, CPU/GPU backends."""
