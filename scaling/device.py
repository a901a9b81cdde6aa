"""CPU and GPU set-up for one rank: device, threads, memory format, mixed precision, determinism.

CPU (Xeon, Xeon Phi): one rank drives a socket or a share of one. Threads per rank come from ``--threads``,
else ``OMP_NUM_THREADS``, else ``cores ÷ local ranks`` (at least 1), so ranks on a node do not oversubscribe
its cores. N threads means N cores' worth of compute in every pool: OpenMP's (PyTorch's intra-op pool and its
oneDNN, NumPy's OpenBLAS) and TensorFlow's intra-op pool (its oneDNN runs there too) get N, the inter-op pools
1 on CPU. TensorFlow's inter-op threads each run a kernel of their own, so two of them ran two kernels at once:
a ``--threads 1`` rank used ~1.5 cores. The sizes go into the environment before the framework is imported
(:func:`preset_thread_environment`) and are set again through the framework's API once the rank knows its
local size. PyTorch's CPU convolutions run on oneDNN; channels-last (NHWC) activations let oneDNN skip layout
reorders. bf16 autocast uses AVX512-BF16/AMX where present. fp16 autocast has no CPU kernels worth using and is
refused.

GPU: rank → local GPU ``local_rank`` (the launcher places ``ranks_per_node`` ranks on a node with as many
GPUs); Horovod uses NCCL for the allreduce when it was built with it. fp16 autocast with a dynamic loss scaler,
or bf16 autocast. Asking for CUDA where there is none fails here, at start, with a clear message.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


class DeviceError(ValueError):
    """The requested device/precision combination cannot run here; the message says why."""


def cores_available() -> int:
    """Cores this process may run on (the affinity mask, which Slurm/cgroups narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(requested: int | None, local_size: int, env: Mapping[str, str] | None = None,
                     cores: int | None = None) -> int:
    """Compute threads for one rank: ``requested``, else OMP_NUM_THREADS, else max(1, cores // local ranks)."""
    env = os.environ if env is None else env
    if requested is not None:
        if requested < 1:
            raise DeviceError(f"--threads must be >= 1, got {requested}")
        return requested
    from_env = env.get("OMP_NUM_THREADS", "").strip()
    if from_env:
        try:
            value = int(from_env.split(",")[0])
        except ValueError:
            raise DeviceError(f"OMP_NUM_THREADS={from_env!r} is not an integer") from None
        if value >= 1:
            return value
    return max(1, (cores or cores_available()) // max(1, local_size))


def launcher_local_size(env: Mapping[str, str] | None = None) -> int | None:
    """Ranks on this node as the launcher announced them before any library starts (None: it did not say)."""
    from larscale.launchenv import LAUNCH_VARIABLES

    env = os.environ if env is None else env
    for variables in LAUNCH_VARIABLES:
        value = env.get(variables.local_size or "", "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return None


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that size a rank's compute pools to ``threads`` cores; read when a library loads.

    OpenMP (PyTorch's intra-op pool, NumPy's OpenBLAS), TensorFlow's intra-op pool (which its oneDNN uses) and
    its inter-op pool: one inter-op thread, because each one runs a kernel of its own beside the others.
    """
    return {"OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": "1"}


def preset_thread_environment(requested: int | None, env: MutableMapping[str, str] | None = None) -> int | None:
    """Put :func:`thread_environment` into ``env`` (default ``os.environ``) before a framework is imported.

    Only when the count is known before the rank joins (``--threads``, OMP_NUM_THREADS, or a launcher that
    announces the local size); otherwise nothing is written, so that ``cores ÷ local ranks`` is still worked
    out once the rank knows its local size, and the framework's API sets the pools then. Returns the threads
    written, or None.
    """
    env = os.environ if env is None else env
    local_size = launcher_local_size(env)
    if requested is None and not env.get("OMP_NUM_THREADS", "").strip() and local_size is None:
        return None
    threads = threads_per_rank(requested, local_size or 1, env)
    env.update(thread_environment(threads))
    return threads


def check_precision(device: str, precision: str) -> None:
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision == "fp16":
        raise DeviceError("--precision fp16 needs --device cuda; on CPU use bf16 (AVX512-BF16/AMX) or fp32")


def require_cuda_torch() -> int:
    """Number of visible GPUs, or DeviceError when this PyTorch or machine has none."""
    import torch

    if not torch.cuda.is_available():
        build = "this PyTorch is a CPU-only build" if torch.version.cuda is None else \
            "no GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
        raise DeviceError(f"--device cuda requested but CUDA is not available: {build}; use --device cpu")
    return torch.cuda.device_count()


def require_gpu_tensorflow() -> int:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        raise DeviceError("--device cuda requested but TensorFlow sees no GPU "
                           "(tensorflow-cpu build or no driver); use --device cpu")
    return len(gpus)


def seed_everything(seed: int) -> None:
    """Seed Python's and NumPy's global generators (frameworks are seeded by their own set-up)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class TorchDevice:
    """What the training loop needs to know about the device of this rank."""

    device: Any  # torch.device
    precision: str
    threads: int
    channels_last: bool
    autocast_dtype: Any | None  # torch.dtype or None for fp32
    scaler: Any | None  # torch.amp.GradScaler for fp16, else None
    details: dict[str, Any] = field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def to_input(self, images: Any) -> Any:
        """Move a batch of images to the device in the chosen memory format (non-blocking from pinned memory)."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            import torch

            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def synchronize(self) -> None:
        """Wait for queued GPU work, so phase timings measure work done and not work queued."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def setup_torch(device: str, precision: str, threads: int | None, local_rank: int, local_size: int,
                memory_format: str = "auto", deterministic: bool = False, seed: int = 0) -> TorchDevice:
    """Configure PyTorch for this rank. Call before building the model."""
    import torch

    check_precision(device, precision)
    if memory_format not in MEMORY_FORMATS:
        raise DeviceError(f"unknown memory format {memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}")
    n_threads = threads_per_rank(threads, local_size)
    torch.set_num_threads(n_threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op parallel work
        torch.set_num_interop_threads(1)
    details: dict[str, Any] = {"mkldnn": bool(torch.backends.mkldnn.is_available()),
                               "thread_pools": {"intra_op": torch.get_num_threads(),
                                                "inter_op": torch.get_num_interop_threads(),
                                                "openmp": _env_int("OMP_NUM_THREADS")}}
    if device == "cuda":
        gpus = require_cuda_torch()
        if local_rank >= gpus:
            raise DeviceError(f"local rank {local_rank} has no GPU: this node shows {gpus}; "
                               "start at most one rank per GPU")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = not deterministic
        details["gpu"] = torch.cuda.get_device_name(local_rank)
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"--precision bf16: {details['gpu']} does not support bf16; use fp16")
    else:
        torch_device = torch.device("cpu")
    if deterministic:
        torch.use_deterministic_algorithms(True)
        if device == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
    torch.manual_seed(seed)
    seed_everything(seed)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    # NHWC by default: oneDNN (CPU) and tensor cores (GPU, mixed precision) both prefer it for convolutions.
    channels_last = memory_format == "channels_last" or (
        memory_format == "auto" and (device == "cpu" or precision != "fp32"))
    return TorchDevice(torch_device, precision, n_threads, channels_last, autocast_dtype, scaler, details)


@dataclass
class TFDevice:
    device_name: str  # "/CPU:0" or "/GPU:0" (the one GPU made visible to this rank)
    precision: str
    threads: int
    details: dict[str, Any] = field(default_factory=dict)


def setup_tensorflow(device: str, precision: str, threads: int | None, local_rank: int, local_size: int,
                     deterministic: bool = False, seed: int = 0) -> TFDevice:
    """Configure TensorFlow for this rank. Call before building the model (thread pools are fixed at first use)."""
    import tensorflow as tf

    check_precision(device, precision)
    n_threads = threads_per_rank(threads, local_size)
    tf.config.threading.set_intra_op_parallelism_threads(n_threads)
    # On CPU every inter-op thread computes a kernel of its own: one, so that N threads are N cores' worth. On a
    # GPU they only launch kernels, and two let the next launch start while one waits.
    tf.config.threading.set_inter_op_parallelism_threads(1 if deterministic or device == "cpu" else 2)
    if device == "cuda":
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            require_gpu_tensorflow()
        if local_rank >= len(gpus):
            raise DeviceError(f"local rank {local_rank} has no GPU: this node shows {len(gpus)}")
        tf.config.set_visible_devices(gpus[local_rank], "GPU")
        tf.config.experimental.set_memory_growth(gpus[local_rank], True)
        device_name = "/GPU:0"
    else:
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.set_visible_devices([], "GPU")
        device_name = "/CPU:0"
    if precision != "fp32":
        policy = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]
        tf.keras.mixed_precision.set_global_policy(policy)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(seed)
    # The trainer feeds tensors from NumPy, without tf.data: no tf.data pool to size.
    pools = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
             "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
             "openmp": _env_int("OMP_NUM_THREADS")}
    return TFDevice(device_name, precision, n_threads, {"thread_pools": pools})


def _env_int(name: str) -> int | None:
    """An integer environment variable as the libraries read it at load (None when unset or not a number)."""
    value = os.environ.get(name, "").split(",")[0].strip()
    return int(value) if value.isdigit() else None


def rng_state_torch() -> dict[str, Any]:
    """Python, NumPy and PyTorch (CPU and every GPU) generator states, for a checkpoint."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_torch(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
