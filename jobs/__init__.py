"""Sweeps to batch scripts (Slurm, PBS, LSF, local): submission, status, result collection."""
