"""Where each launcher puts a process's rank: the one table (every other list of rank variables derives from it).

Read before any library is initialised (a command-line mistake is printed by rank 0 only: larscale/__init__.py),
by torch.distributed's rank discovery (scaling/comm_ddp.py) and by Horovod's lone-process check
(scaling/comm_horovod.py). Each row names its public source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankVariables:
    """The variables one launcher sets in every process it starts."""

    launcher: str
    rank: str
    size: str | None
    local_rank: str | None
    local_size: str | None
    # The name scaling/comm_ddp.py gives ranks found this way (None: DDP does not discover its ranks here).
    ddp: str | None
    # Set only by MPI launchers (and horovodrun): a process that sees it was started as a Horovod rank.
    mpi: bool
    source: str


LAUNCH_VARIABLES: tuple[RankVariables, ...] = (
    RankVariables("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "torchrun", False,
                  "PyTorch docs, torchrun (Elastic Launch): environment variables"),
    RankVariables("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                  "OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun", True,
                  "Open MPI docs 11.1, environment variables set for MPI applications"),
    RankVariables("pmix", "PMIX_RANK", None, None, None, None, True, "PMIx standard, PMIX_RANK"),
    RankVariables("hydra", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "mpirun", True,
                  "MPICH / Intel MPI Hydra process manager (mpiexec.hydra): PMI_RANK, PMI_SIZE"),
    # SLURM_STEP_NUM_TASKS: only inside an srun step (a batch script's shell has SLURM_PROCID=0 too).
    RankVariables("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None, "srun", False,
                  "srun(1), OUTPUT ENVIRONMENT VARIABLES"),
    RankVariables("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", None,
                  True, "Horovod's gloo runner (horovod/runner/gloo_run.py) environment"),
    RankVariables("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
                  "MV2_COMM_WORLD_LOCAL_SIZE", None, True, "MVAPICH2 user guide, run-time environment variables"),
    RankVariables("pals", "PALS_RANKID", None, "PALS_LOCAL_RANKID", None, None, True,
                  "HPE Cray PALS mpiexec (ALCF Polaris docs: PALS_LOCAL_RANKID for GPU binding)"),
    RankVariables("flux", "FLUX_TASK_RANK", "FLUX_JOB_SIZE", "FLUX_TASK_LOCAL_ID", None, None, False,
                  "flux-core job shell environment (FLUX_TASK_RANK, FLUX_TASK_LOCAL_ID, FLUX_JOB_SIZE)"),
)

# Where launchers put a process's rank before any library is initialised, in the order they are tried.
RANK_VARIABLES = tuple(v.rank for v in LAUNCH_VARIABLES)
# Present only in processes an MPI launcher (or horovodrun) started.
MPI_LAUNCH_VARIABLES = tuple(v.rank for v in LAUNCH_VARIABLES if v.mpi)
# (ddp launcher name, rank, size, local rank, local size) for torch.distributed's own discovery, in order.
DDP_LAUNCH_VARIABLES = tuple((v.ddp, v.rank, v.size, v.local_rank, v.local_size) for v in LAUNCH_VARIABLES
                             if v.ddp is not None)
