"""What the installed Horovod was built with: the check bootstrap.sh runs after installing it (``verify``), and the
one line it prints at its end (``verify --report``). Imports Horovod, so only those two commands pay for it."""

from __future__ import annotations

from collections.abc import Sequence


def verify_installed(features: Sequence[str]) -> list[str]:
    """The features (``Request.features``) the installed Horovod lacks; ["horovod"] when it does not import."""
    try:
        import horovod.torch as hvd_torch  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - not installed, or built against another torch
        return ["horovod"]
    checks = {"torch": lambda: True, "gloo": hvd_torch.gloo_built, "mpi": hvd_torch.mpi_built,
              "nccl": hvd_torch.nccl_built}
    lacking = [f for f in features if f in checks and not checks[f]()]
    if "tensorflow" in features:
        try:
            import horovod.tensorflow as hvd_tf  # noqa: PLC0415

            if ("gloo" in features and not hvd_tf.gloo_built()) or ("mpi" in features and not hvd_tf.mpi_built()):
                lacking.append("tensorflow")
        except Exception:  # noqa: BLE001
            lacking.append("tensorflow")
    return lacking


def installed_summary() -> str:
    """One line of what the installed Horovod was built with: what `horovodrun --check-build` lists, without
    the launcher's own start-up (bootstrap.sh prints it at the end)."""
    import horovod  # noqa: PLC0415
    import horovod.torch as hvd_torch  # noqa: PLC0415

    frameworks = ["PyTorch"]
    try:
        import horovod.tensorflow  # noqa: F401, PLC0415

        frameworks.append("TensorFlow")
    except Exception:  # noqa: BLE001 - built without it, or no TensorFlow here
        pass
    controllers = [name for name, built in (("MPI", hvd_torch.mpi_built()), ("Gloo", hvd_torch.gloo_built()))
                   if built]
    gpu = "NCCL" if hvd_torch.nccl_built() else "none"
    return (f"Horovod {horovod.__version__}: frameworks {', '.join(frameworks)}; controllers "
            f"{', '.join(controllers) or 'none'}; GPU operations {gpu}")
