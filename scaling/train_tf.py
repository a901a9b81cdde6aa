"""TensorFlow 2 path of ``larscale train`` (``--framework tensorflow``): a custom loop with Horovod.

Same options, data order, step log, summary and exit statuses as the PyTorch path (scaling/train.py). A step
is three compiled functions so that each phase can be timed:

1. ``forward_backward``: loss and this rank's gradients from a ``tf.GradientTape``; timed as ``compute_s``;
2. ``average``: ``hvd.grouped_allreduce(grads, op=Average)`` — the reduction ``hvd.DistributedGradientTape``
   performs inside its ``gradient()`` call, issued as one fused group; timed as ``allreduce_s``. The tape would
   fuse steps 1 and 2 into one call and leave the allreduce time unmeasurable; the split computes the same
   average (on CPU TensorFlow returns all gradients of a tape at once, so little overlap is lost);
3. ``apply``: the optimizer update; for SGD, L2 weight decay is first added to the gradients of ≥ 2-D weights
   (coupled, as PyTorch's SGD does), LARS applies its own; timed as ``optimizer_s``.

Checkpoints hold NumPy arrays (pickled, no torch needed): model weights, optimizer variables, the step, the
Python and NumPy RNG states per rank and the configuration.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod needs tf.Variables (Keras 2), see README

from scaling.train import (  # noqa: E402
    EXIT_FAILED,
    EXIT_RESUMABLE,
    Progress,
    StepTimes,
    StopRequested,
    TrainConfig,
    base_versions,
    build_summary,
    dataset_facts,
    log,
    make_plan,
    start_rank,
    train_set_size,
    usage_error,
    write_summary,
)


def tiny_keras_model(num_classes: int, image_size: int) -> Any:
    """The trainer's no-BN test network (scaling.train.tiny_torch_model) in Keras, NHWC."""
    import tensorflow as tf

    if image_size % 8:
        raise usage_error(f"--model tiny with TensorFlow needs --image-size divisible by 8, got {image_size}")
    layers = tf.keras.layers
    return tf.keras.Sequential([
        layers.InputLayer(input_shape=(image_size, image_size, 3)),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.AveragePooling2D(image_size // 8),
        layers.Flatten(),
        layers.Dense(num_classes),
    ])


def build_keras_model(name: str, num_classes: int, image_size: int) -> Any:
    if name == "tiny":
        return tiny_keras_model(num_classes, image_size)
    import models

    try:
        return models.get(name, framework="tensorflow", num_classes=num_classes, image_size=image_size)
    except ValueError as err:
        raise usage_error(f"--model {name}: {err}") from None


def make_keras_optimizer(config: TrainConfig, plan: Any) -> Any:
    import tensorflow as tf

    if config.optimizer == "sgd":
        return tf.keras.optimizers.SGD(learning_rate=plan.base_lr, momentum=plan.momentum)
    from scaling.optim_tf import LARS

    # LARS applies weight decay itself (and needs the unregularised gradient for its trust ratio).
    return LARS(learning_rate=plan.base_lr, momentum=plan.momentum, weight_decay=plan.weight_decay,
                trust_coefficient=plan.trust_coefficient)


class TFData:
    """This rank's micro-batches as NHWC float32 / int64 tensors (same order rules as the torch path)."""

    def __init__(self, config: TrainConfig, plan: Any, spec: Any, rank: int, ranks: int) -> None:
        import numpy as np
        import tensorflow as tf

        from scaling import data

        self.config, self.plan, self.spec, self.rank, self.ranks = config, plan, spec, rank, ranks
        self.kind = spec.kind
        b = plan.batch
        if self.kind == "synthetic":
            images, labels = data.synthetic_arrays(b.batch_per_rank, plan.image_size, plan.num_classes,
                                                   config.seed, rank)
            self.fixed = (tf.constant(images.transpose(0, 2, 3, 1)), tf.constant(labels))
            self.train_size = data.IMAGENET_TRAIN_IMAGES
        elif self.kind == "digits":
            self.arrays = data.load_digits(plan.image_size, config.seed)
            self.train_x = np.ascontiguousarray(self.arrays.train_x.transpose(0, 2, 3, 1))
            self.train_y = self.arrays.train_y
            self.train_size = len(self.train_y)
        else:
            self.train_set, self.val_set = data.imagenet_datasets(spec, plan.image_size, config.augmentation,
                                                                  config.seed)
            self.train_size = len(self.train_set)
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max(1, config.workers))
        self._perm_epoch, self._perm = -1, None

    def micro_batches(self, step: int) -> Any:
        import tensorflow as tf

        from scaling import data

        b, spe = self.plan.batch, self.plan.steps_per_epoch
        epoch, position = divmod(step, spe)
        if self.kind == "synthetic":
            for _ in range(b.accumulation):
                yield self.fixed
            return
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = data.epoch_permutation(self.train_size, self.config.seed, epoch), epoch
        for idx in data.rank_micro_batches(self._perm, position, b.global_batch, self.rank, b.batch_per_rank,
                                           b.accumulation):
            if self.kind == "digits":
                yield tf.constant(self.train_x[idx]), tf.constant(self.train_y[idx])
            else:
                items = list(self.pool.map(self.train_set.__getitem__, [(int(i), epoch) for i in idx]))
                images = tf.constant([x.transpose(1, 2, 0) for x, _ in items])
                yield images, tf.constant([y for _, y in items], dtype=tf.int64)

    def eval_batches(self) -> Any:
        import numpy as np
        import tensorflow as tf

        from scaling import data

        size = max(1, self.plan.batch.batch_per_rank * 2)
        if self.kind == "digits":
            shard = data.eval_shard(len(self.arrays.test_y), self.rank, self.ranks)
            x = self.arrays.test_x[shard].transpose(0, 2, 3, 1)
            y = self.arrays.test_y[shard]
            return ((tf.constant(np.ascontiguousarray(x[i:i + size])), tf.constant(y[i:i + size]))
                    for i in range(0, len(y), size))
        if self.kind == "imagenet":
            shard = data.eval_shard(len(self.val_set), self.rank, self.ranks)

            def batches():
                for j in range(0, len(shard), size):
                    images, labels = self.val_set.batch([int(i) for i in shard[j:j + size]])
                    yield tf.constant(images.transpose(0, 2, 3, 1)), tf.constant(labels)
            return batches()
        return None


def run_tensorflow(config: TrainConfig) -> int:
    import horovod.tensorflow as hvd
    import numpy as np
    import tensorflow as tf

    from larscale.runformat import StepLog
    from scaling import checkpoint as ckpt
    from scaling.backend import BackendError, require_gpu_tensorflow, setup_tensorflow

    if config.device == "cuda":
        try:
            require_gpu_tensorflow()
        except BackendError as err:
            raise usage_error(str(err)) from None
    spec, image_size, num_classes = dataset_facts(config)
    start = start_rank(config, hvd, lambda info: setup_tensorflow(
        config.device, config.precision, config.threads, info.local_rank, info.local_size, config.deterministic,
        config.seed))
    info, backend, watchdog, stop, started_at = start.info, start.backend, start.watchdog, start.stop, start.started_at
    rank, ranks = info.rank, info.ranks
    all_hosts, all_local_sizes, startup_timeout = start.hosts, start.local_sizes, start.startup_timeout

    plan = make_plan(config, ranks, train_set_size(spec, config.seed), image_size, num_classes)
    with tf.device(backend.device_name):
        tf.keras.utils.set_random_seed(config.seed)  # same initial weights everywhere (broadcast below anyway)
        model = build_keras_model(config.model, num_classes, image_size)
        optimizer = make_keras_optimizer(config, plan)
        optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    decayed = [len(v.shape) > 1 for v in variables]
    accumulation = plan.batch.accumulation
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def forward_backward(images: Any, labels: Any) -> Any:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, tf.cast(logits, tf.float32))
        return loss, tape.gradient(loss, variables)

    @tf.function
    def average(grads: Any) -> Any:
        return hvd.grouped_allreduce(list(grads), op=hvd.Average)

    @tf.function
    def apply(grads: Any, lr: Any) -> None:
        optimizer.learning_rate.assign(lr)
        wd = plan.weight_decay if config.optimizer == "sgd" else 0.0  # LARS decays inside its update
        grads = [g + wd * v if d and wd else g for g, v, d in zip(grads, variables, decayed, strict=True)]
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    # Resume from rank 0's newest complete checkpoint; broadcast weights and optimizer state from rank 0.
    state, resumed_from = None, None
    if config.resume and rank == 0:
        found = ckpt.latest(config.out)
        if found is not None:
            resumed_from, state = str(found[0]), found[1]
    with watchdog.waiting("resume broadcast", startup_timeout):
        header = hvd.broadcast_object({"step": state["step"] if state else 0, "path": resumed_from,
                                       "rng": state.get("rng_per_rank") if state else None,
                                       "ranks": state["ranks"] if state else None}, root_rank=0,
                                      name="larscale.resume")
    if config.resume and header["path"] is None:
        log(rank, f"--resume: no complete checkpoint in {config.out}/checkpoints; starting from step 0")
    start_step = header["step"]
    if state is not None:
        model.set_weights(state["model"])
        for var, value in zip(optimizer.variables, state["optimizer"], strict=True):
            var.assign(value)
    with watchdog.waiting("parameter broadcast", startup_timeout):
        hvd.broadcast_variables(model.variables, root_rank=0)
        hvd.broadcast_variables(optimizer.variables, root_rank=0)
    import random

    if header["rng"] is not None and header["ranks"] == ranks:
        random.setstate(header["rng"][rank]["python"])
        np.random.set_state(header["rng"][rank]["numpy"])
    else:
        random.seed(config.seed + rank)
        np.random.seed((config.seed + rank) % 2**32)
        tf.random.set_seed(config.seed * 1_000_003 + rank + 7919 * start_step)

    data_source = TFData(config, plan, spec, rank, ranks)
    step_log = StepLog(config.out, rank, keep_below=start_step if config.resume else None)
    times = StepTimes()
    versions = {**base_versions(), "tensorflow": tf.__version__}
    log(rank, f"{ranks} ranks ({info.controller}), model {config.model} (tensorflow), dataset {spec.name}, global "
        f"batch {plan.batch.global_batch} = {plan.batch.batch_per_rank} × {ranks} × {accumulation}, steps "
        f"{start_step}→{plan.total_steps}, {backend.threads} threads/rank, {backend.device_name}, {config.precision}")

    def save_checkpoint(step: int) -> str | None:
        with watchdog.waiting("checkpoint RNG gather", config.stall_timeout):
            rng_states = hvd.allgather_object({"python": random.getstate(), "numpy": np.random.get_state()},
                                              name="larscale.rng")
        if rank != 0:
            return None
        payload = {"model": model.get_weights(), "optimizer": [v.numpy() for v in optimizer.variables],
                   "schedule_step": step, "epoch": step // plan.steps_per_epoch,
                   "position_in_epoch": step % plan.steps_per_epoch, "rng_per_rank": rng_states, "ranks": ranks,
                   "config": asdict(config), "framework": "tensorflow"}
        return str(ckpt.save(config.out, step, payload, config.keep))

    def finish(status: str, step: int, checkpoint_path: str | None, evaluation: dict | None) -> None:
        with watchdog.waiting("summary gather", config.stall_timeout):
            gathered = hvd.allgather_object(times, name="larscale.summary")
        if rank == 0:
            summary = build_summary(config, plan, status, info, all_hosts, all_local_sizes, gathered, step,
                                    backend.threads, versions, started_at, checkpoint_path, evaluation, spec.name)
            summary["backend"] = {"threads_per_rank": backend.threads, "device": backend.device_name,
                                  "allreduce": "hvd.grouped_allreduce after backward",
                                  "nccl": bool(hvd.nccl_built())}
            summary["resumed_from"] = resumed_from
            write_summary(config.out, summary)

    def evaluate() -> dict[str, float] | None:
        batches = data_source.eval_batches()
        if batches is None:
            return None
        counts = np.zeros(3)
        for images, labels in batches:
            logits = tf.cast(model(images, training=False), tf.float32)
            k = min(5, logits.shape[1])
            top = tf.math.top_k(logits, k=k).indices.numpy()
            hit = top == labels.numpy()[:, None]
            counts += [hit[:, 0].sum(), hit.any(axis=1).sum(), len(hit)]
        with watchdog.waiting("evaluation allreduce", config.stall_timeout):
            total = hvd.allreduce(tf.constant(counts, dtype=tf.float64), op=hvd.Sum, name="larscale.eval").numpy()
        n = max(total[2], 1.0)
        return {"top1": float(total[0] / n), "top5": float(total[1] / n)}

    step = start_step
    progress = Progress(rank, start_step, plan.total_steps, config.log_every)
    last_checkpoint = None
    timer = time.perf_counter
    try:
        boundary = timer()
        with tf.device(backend.device_name):
            while step < plan.total_steps:
                epoch = step // plan.steps_per_epoch
                lr = plan.lr_at(step)
                data_s = compute_s = 0.0
                loss_sum = 0.0
                summed = None
                t = timer()
                batches = data_source.micro_batches(step)
                for _ in range(accumulation):
                    images, labels = next(batches)
                    t_data = timer()
                    data_s += t_data - t
                    loss, grads = forward_backward(images, labels)
                    loss_sum += float(loss.numpy())
                    summed = list(grads) if summed is None else [a + g for a, g in zip(summed, grads, strict=True)]
                    t = timer()
                    compute_s += t - t_data
                if accumulation > 1:
                    summed = [g / accumulation for g in summed]
                with watchdog.waiting("gradient allreduce", config.stall_timeout):
                    reduced = average(summed)
                    _ = [g.numpy() for g in reduced[:1]]
                t_reduced = timer()
                apply(reduced, tf.constant(lr, dtype=tf.float32))
                t_done = timer()
                step += 1
                # Stop agreement at every boundary (TF's allreduce is synchronous here; it costs one tiny
                # collective per step).
                with watchdog.waiting("stop-flag allreduce", config.stall_timeout):
                    agreed_stop = float(hvd.allreduce(tf.constant([1.0 if stop.local else 0.0]), op=hvd.Sum,
                                                      name="larscale.stop").numpy()[0]) > 0
                now = timer()
                record = {
                    "step": step - 1, "epoch": epoch, "rank": rank, "ranks": ranks,
                    "batch_per_rank": plan.batch.batch_per_rank, "global_batch": plan.batch.global_batch,
                    "data_s": data_s, "compute_s": compute_s, "allreduce_s": t_reduced - t,
                    "optimizer_s": t_done - t_reduced, "step_s": now - boundary,
                    "images_per_s": plan.batch.batch_per_rank * accumulation / (now - boundary),
                    "lr": lr, "loss": loss_sum / accumulation, "time": time.time(),
                }
                step_log.write(record)
                times.add(record)
                progress.update(record)
                if agreed_stop:
                    raise StopRequested
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < plan.total_steps:
                    last_checkpoint = save_checkpoint(step) or last_checkpoint
                boundary = timer()
            last_checkpoint = save_checkpoint(step) or last_checkpoint
            evaluation = evaluate() if config.eval else None
        if evaluation is not None:
            log(rank, f"eval: top-1 {evaluation['top1']:.4f} top-5 {evaluation['top5']:.4f}")
        finish("complete", step, last_checkpoint, evaluation)
        progress.close()
        log(rank, f"complete: {step} steps; summary {Path(config.out) / 'summary.json'}")
        return 0
    except StopRequested:
        progress.close()
        last_checkpoint = save_checkpoint(step) or last_checkpoint
        finish("interrupted", step, last_checkpoint, None)
        with watchdog.waiting("final barrier", config.stall_timeout):
            hvd.allreduce(tf.zeros(1), name="larscale.barrier")
        log(rank, f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; checkpoint "
            f"{last_checkpoint}; resume with --resume (exit {EXIT_RESUMABLE})")
        return EXIT_RESUMABLE
    except Exception as err:
        progress.close()
        traceback.print_exc()
        print(f"larscale train: rank {rank}: failed at step {step}: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        if rank == 0:
            with contextlib.suppress(Exception):
                write_summary(config.out, build_summary(
                    config, plan, "failed", info, all_hosts, all_local_sizes, [times], step, backend.threads,
                    versions, started_at, last_checkpoint, None, spec.name))
        return EXIT_FAILED
    finally:
        step_log.close()
        stop.restore()
        watchdog.stop()
