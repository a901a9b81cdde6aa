"""The PyTorch side of a run: model, optimizer, data, the step's pieces, checkpoints and RNG streams.

Used by the rank lifecycle (scaling/loop.py) through the :class:`scaling.framework.Framework` seam; gradients are
averaged by the communicator's ``torch_gradients`` (Horovod's DistributedOptimizer or DDP).

``--compile`` runs ``torch.compile`` on the module that forward goes through (the DDP wrapper under DDP, so its
optimizer splits the graph at bucket boundaries). Horovod starts an allreduce from a hook on each parameter's
gradient; a compiled backward produces its gradients at the end of its graph, so those allreduces may no longer
overlap backward. Hooks after each gradient's accumulation note when it became ready; the summary's
``backend.grad_ready_spread`` is the share of backward over which the gradients of a step arrived (median over
steps: ~0.9 eager, ~0 when all arrive at the end) and ``backend.allreduce_overlap`` says ``layerwise`` or ``none``
(below 0.25), which analysis/ models.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

from scaling.comm import TorchCommunicator, TorchGradients
from scaling.config import TrainConfig, usage_error
from scaling.framework import DeviceSummary, HostClock
from scaling.rank import RankInfo
from scaling.runplan import RunPlan

# Below this share of backward the gradients arrived together: their allreduces could not overlap backward.
OVERLAP_SPREAD = 0.25


def torch_checkpoint_bytes(model: Any) -> int:
    """Lower bound of a checkpoint's size: the model's state plus one momentum buffer per parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def tiny_torch_model(num_classes: int) -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 4 * 4, num_classes))


def build_torch_model(name: str, num_classes: int, image_size: int) -> Any:
    if name == "tiny":
        return tiny_torch_model(num_classes)
    import models

    try:
        return models.get(name, framework="torch", num_classes=num_classes, image_size=image_size)
    except ValueError as err:
        raise usage_error(f"--model {name}: {err}") from None


def route_convolutions(model: Any) -> int:
    """``--cpu-kernels fast``: send every convolution of ``model`` to oneDNN; returns how many were re-routed.

    PyTorch runs a 1x1 convolution with stride 1 on its own GEMM path instead of oneDNN when it has one thread and
    fewer than 16 images (ATen's ConvParams::use_mkldnn); on one core that path is slower, forward and backward
    (benchmarks/README.md, bench_cpu.py). A 1x1 kernel has a single tap, so its dilation changes nothing in the
    result, but a dilated convolution always goes to oneDNN, which runs it with its 1x1 kernels: dilation 2 on those
    convolutions re-routes them. Parameters, state_dict and checkpoints are unchanged; the sums run in oneDNN's
    order, so losses differ from the default's by rounding.
    """
    import torch.nn as nn

    routed = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) \
                and module.dilation == (1, 1) and module.groups == 1:
            module.dilation = (2, 2)
            routed += 1
    return routed


def torch_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weights (≥ 2-D) get weight decay and the LARS trust ratio; biases and BN parameters (1-D) neither, as in
    the MLPerf reference LARS."""
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": weight_decay, "lars": True}]
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lars": False})
    return groups


def make_torch_optimizer(config: TrainConfig, plan: RunPlan, model: Any) -> Any:
    import torch

    groups = torch_param_groups(model, plan.weight_decay)
    if config.optimizer == "sgd":
        # --cpu-kernels fast: the fused kernel updates a tensor in one pass (read w, g, v; write w, v) where the
        # default loop makes eleven; the same formula, but a tensor's last elements (under one vector) round apart.
        return torch.optim.SGD(groups, lr=plan.base_lr, momentum=plan.momentum,
                               fused=True if config.cpu_kernels == "fast" else None)
    from scaling.optim_fast import FastLARS

    return FastLARS(groups, lr=plan.base_lr, momentum=plan.momentum, weight_decay=plan.weight_decay,
                trust_coefficient=plan.trust_coefficient)


class TorchData:
    """This rank's batches for one framework-neutral plan: ``micro_batches(step)`` yields (images, labels)."""

    def __init__(self, config: TrainConfig, plan: RunPlan, spec: Any, device_setup: Any, rank: int, ranks: int,
                 start_step: int) -> None:
        import torch

        from scaling import data

        self.config, self.plan, self.spec, self.device_setup = config, plan, spec, device_setup
        self.rank, self.ranks = rank, ranks
        self.kind = spec.kind
        b = plan.batch
        if self.kind == "synthetic":
            gen = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + rank)
            images = torch.randn(b.batch_per_rank, 3, plan.image_size, plan.image_size, generator=gen)
            labels = torch.randint(0, plan.num_classes, (b.batch_per_rank,), generator=gen)
            self.fixed = (device_setup.to_input(images), labels.to(device_setup.device))
            self.train_size = data.IMAGENET_TRAIN_IMAGES
        elif self.kind == "digits":
            arrays = data.load_digits(plan.image_size, config.seed)
            self.arrays = arrays
            self.train_x = torch.from_numpy(arrays.train_x).to(device_setup.device)
            self.train_y = torch.from_numpy(arrays.train_y).to(device_setup.device)
            self.train_size = len(arrays.train_y)
            self._perm_epoch, self._perm = -1, None
        else:
            # Workers hand over uint8 crops; the device normalises them (see scaling.data.ImageFolderData).
            self.train_set, self.val_set = data.imagenet_datasets(spec, plan.image_size, config.augmentation,
                                                                  config.seed, as_uint8=True)
            self.train_size = len(self.train_set)
            self._loader_epoch, self._loader_iter = -1, None
            shape = (1, 3, 1, 1)
            device = device_setup.device
            self._mean = torch.tensor(data.IMAGENET_MEAN * 255.0, dtype=torch.float32).view(shape).to(device)
            self._std = torch.tensor(data.IMAGENET_STD * 255.0, dtype=torch.float32).view(shape).to(device)
        self.start_step = start_step

    def micro_batches(self, step: int) -> Iterator[tuple[Any, Any]]:
        import torch

        from scaling import data

        b, spe = self.plan.batch, self.plan.steps_per_epoch
        epoch, position = divmod(step, spe)
        if self.kind == "synthetic":
            for _ in range(b.accumulation):
                yield self.fixed
        elif self.kind == "digits":
            if epoch != self._perm_epoch:
                self._perm = data.epoch_permutation(self.train_size, self.config.seed, epoch)
                self._perm_epoch = epoch
            for idx in data.rank_micro_batches(self._perm, position, b.global_batch, self.rank, b.batch_per_rank,
                                               b.accumulation):
                index = torch.from_numpy(idx).to(self.device_setup.device)
                images = self.device_setup.to_input(self.train_x.index_select(0, index))
                yield images, self.train_y.index_select(0, index)
        else:
            if epoch != self._loader_epoch:
                self._loader_iter = iter(self._loader(epoch, position))
                self._loader_epoch = epoch
            for _ in range(b.accumulation):
                images, labels = next(self._loader_iter)
                yield self._normalised(images), labels.to(self.device_setup.device, non_blocking=True)

    def _loader(self, epoch: int, start_position: int) -> Any:
        import torch

        from scaling import data

        b = self.plan.batch
        sampler = data.ShardBatchSampler(self.train_size, b.global_batch, b.batch_per_rank, b.accumulation,
                                         self.rank, self.config.seed, epoch, start_position)
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=self.config.workers,
            pin_memory=self.device_setup.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if self.config.workers > 0 else None)

    def eval_batches(self) -> Iterator[tuple[Any, Any]] | None:
        import torch

        from scaling import data

        size = max(1, self.plan.batch.batch_per_rank * 2)
        if self.kind == "digits":
            shard = data.eval_shard(len(self.arrays.test_y), self.rank, self.ranks)
            x, y = torch.from_numpy(self.arrays.test_x[shard]), torch.from_numpy(self.arrays.test_y[shard])
            return ((self.device_setup.to_input(x[i:i + size]), y[i:i + size].to(self.device_setup.device))
                    for i in range(0, len(y), size))
        if self.kind == "imagenet":
            shard = data.eval_shard(len(self.val_set), self.rank, self.ranks)
            keys = [[int(i) for i in shard[j:j + size]] for j in range(0, len(shard), size)]
            loader = torch.utils.data.DataLoader(self.val_set, batch_sampler=keys, num_workers=self.config.workers)
            return ((self._normalised(x), y.to(self.device_setup.device)) for x, y in loader)
        return None

    def _normalised(self, images: Any) -> Any:
        """uint8 crops from the loader → normalised float32 on the device, in the run's memory format."""
        images = images.to(self.device_setup.device, non_blocking=True).float()
        return self.device_setup.to_input((images - self._mean) / self._std)


class CudaClock:
    """Marks are CUDA events in the current stream; a step is read once its last event has passed."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, device

    def mark(self) -> Any:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3

    def ready(self, mark: Any) -> bool:
        return bool(mark.query())

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)


class GradientReadyProbe:
    """When, within backward, did the parameters' gradients become ready (host times)?"""

    def __init__(self, parameters: Sequence[Any]) -> None:
        self.ready_times: list[float] = []
        self.spreads: list[float] = []
        self._start = 0.0
        for parameter in parameters:
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, parameter: Any) -> None:
        self.ready_times.append(time.perf_counter())

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        self.ready_times.clear()
        self._start = time.perf_counter()
        yield
        duration = time.perf_counter() - self._start
        if self.ready_times and duration > 0:
            self.spreads.append((max(self.ready_times) - min(self.ready_times)) / duration)

    def summary(self) -> dict[str, Any]:
        if not self.spreads:
            return {}
        spread = statistics.median(self.spreads)
        return {"grad_ready_spread": spread, "allreduce_overlap": "layerwise" if spread >= OVERLAP_SPREAD else "none"}


def check_compile(device: str) -> None:
    """``--compile`` needs inductor's compiler: a C++ compiler for CPU kernels, Triton for GPU kernels."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError as err:
        raise usage_error(f"--compile: this PyTorch cannot compile ({err}); drop --compile") from None
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise usage_error("--compile --device cuda: Triton is not installed (inductor generates GPU kernels "
                              "with it); install the triton that matches this PyTorch, or drop --compile")
        return
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if not any(shutil.which(c) for c in candidates):
        raise usage_error(f"--compile: no C++ compiler found ({', '.join(candidates)}): inductor compiles CPU kernels "
                          "with one; install g++ (or set CXX), or drop --compile")


class TorchTraining:
    """The :class:`scaling.framework.Framework` of PyTorch runs."""

    name = "torch"

    def __init__(self, config: TrainConfig) -> None:
        import torch

        self.config, self.torch = config, torch
        self.checkpoint_dump = torch.save
        self.checkpoint_load = lambda handle: torch.load(handle, map_location="cpu", weights_only=False)
        self._restored: tuple[Any, Any] | None = None

    def preflight(self) -> None:
        from scaling.device import DeviceError, require_cuda_torch

        if self.config.device == "cuda":
            try:
                require_cuda_torch()
            except DeviceError as err:
                raise usage_error(str(err)) from None
        if self.config.compile:
            check_compile(self.config.device)

    def setup(self, info: RankInfo) -> DeviceSummary:
        from scaling.device import DeviceError, setup_torch

        c = self.config
        try:
            self.device_setup = setup_torch(c.device, c.precision, c.threads, info.local_rank, info.local_size,
                                       c.memory_format, c.deterministic, c.seed)
        except DeviceError as err:
            raise usage_error(f"rank {info.rank}: {err}", every_rank=True) from None
        return DeviceSummary(str(self.device_setup.device), self.device_setup.threads,
                           {"channels_last": self.device_setup.channels_last, **self.device_setup.details})

    def build(self, plan: RunPlan, comm: TorchCommunicator) -> None:
        torch, c = self.torch, self.config
        self.accumulation = plan.batch.accumulation
        # Identical initial weights on every rank (same seed; broadcast from rank 0 anyway). Parameters stay in the
        # default (contiguous) layout even with channels-last: Horovod only reduces and broadcasts contiguous
        # tensors, and autograd keeps each gradient in its parameter's layout. NHWC inputs alone make the
        # convolutions run channels-last.
        torch.manual_seed(c.seed)
        self.model = build_torch_model(c.model, plan.num_classes, plan.image_size).to(self.device_setup.device)
        self.convolutions_rerouted = route_convolutions(self.model) if c.cpu_kernels == "fast" else 0
        optimizer = make_torch_optimizer(c, plan, self.model)
        self.grads: TorchGradients = comm.torch_gradients(self.model, optimizer, plan.batch.accumulation)
        self.optimizer = self.grads.optimizer
        self.forward_module = torch.compile(self.grads.module) if c.compile else self.grads.module
        self.criterion = torch.nn.CrossEntropyLoss()
        self.probe = GradientReadyProbe(list(self.model.parameters()))

    def checkpoint_bytes(self) -> int:
        return torch_checkpoint_bytes(self.model)

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.model.load_state_dict(state["model"])
            self._restored = (state["optimizer"], state.get("scaler"))

    def broadcast_state(self, comm: TorchCommunicator, resumed: bool) -> None:
        self.grads.broadcast_parameters(self.model.state_dict())
        if resumed:
            # The optimizer state travels pickled, not through hvd.broadcast_optimizer_state: that one sends
            # hyper-parameters (momentum, weight decay) as float32 tensors and rounds them, which breaks a bitwise
            # resume. A fresh start needs no broadcast: every rank builds the same empty state.
            optimizer_state, scaler_state = comm.broadcast_object(self._restored, name="larscale.optimizer")
            self.optimizer.load_state_dict(optimizer_state)
            if scaler_state is not None and self.device_setup.scaler is not None:
                self.device_setup.scaler.load_state_dict(scaler_state)
        self._restored = None

    def seed_rng(self, seed: int, rank: int, start_step: int) -> None:
        import numpy as np

        # Per-rank streams (dropout masks differ between ranks); the data order needs no RNG state.
        self.torch.manual_seed(seed * 1_000_003 + rank + 7919 * start_step)
        random.seed(seed + rank)
        np.random.seed((seed + rank) % 2**32)

    def rng_state(self) -> Any:
        from scaling.device import rng_state_torch

        return rng_state_torch()

    def restore_rng(self, state: Any) -> None:
        from scaling.device import restore_rng_torch

        restore_rng_torch(state)

    def data(self, plan: RunPlan, spec: Any, rank: int, ranks: int, start_step: int) -> TorchData:
        return TorchData(self.config, plan, spec, self.device_setup, rank, ranks, start_step)

    def clock(self) -> Any:
        return CudaClock(self.device_setup.device) if self.device_setup.device.type == "cuda" else HostClock()

    def device_scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, images: Any, labels: Any, last: bool) -> Any:
        scaler = self.device_setup.scaler
        with self.grads.micro_batch(last):
            with self.device_setup.autocast():
                loss = self.criterion(self.forward_module(images), labels)
            scaled = loss / self.accumulation
            with self.probe.backward() if last else contextlib.nullcontext():
                self.grads.backward(scaler.scale(scaled) if scaler is not None else scaled)
        if self.device_setup.device.type != "cuda":
            return loss.detach()
        # Copied to pinned host memory in the stream: read once the step's last event has passed, it costs no
        # synchronisation (``loss.item()`` on the device tensor would wait for the whole queue).
        on_host = self.torch.empty((), dtype=loss.dtype, pin_memory=True)
        on_host.copy_(loss.detach(), non_blocking=True)
        return on_host

    def wait_gradients(self) -> float:
        return self.grads.wait()

    def apply(self) -> None:
        scaler = self.device_setup.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        with self.grads.step_context():
            if scaler is not None:
                scaler.step(self.optimizer)
                scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad()

    def loss_value(self, losses: Sequence[Any]) -> float:
        total = 0.0
        for loss in losses:
            total += loss.item()
        return total / len(losses)

    def checkpoint_payload(self) -> dict[str, Any]:
        scaler = self.device_setup.scaler
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}

    def evaluate(self, batches: Iterator[tuple[Any, Any]]) -> list[float]:
        torch = self.torch
        counts = [0.0, 0.0, 0.0]
        self.model.eval()
        with torch.no_grad():
            for images, labels in batches:
                with self.device_setup.autocast():
                    logits = self.model(images)
                top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
                hit = top.eq(labels.view(-1, 1))
                counts[0] += hit[:, 0].sum().item()
                counts[1] += hit.any(dim=1).sum().item()
                counts[2] += len(labels)
        self.model.train()
        return counts

    def describe(self) -> dict[str, Any]:
        return {"compiled": self.config.compile, "cpu_kernels": self.config.cpu_kernels,
                "convolutions_rerouted": self.convolutions_rerouted, **self.probe.summary()}

    def versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__}
