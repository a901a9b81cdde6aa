"""The TensorFlow 2 side of a run (``--framework tensorflow``), with Horovod: same options, data order, step log,
summary, checkpoints rules and exit statuses as PyTorch's, through the same lifecycle (scaling/loop.py).

A step is three compiled functions so that the lifecycle can time each phase:

1. ``forward_backward``: loss and this rank's gradients from a ``tf.GradientTape`` (``compute_s``);
2. ``average``: the communicator's ``hvd.grouped_allreduce(grads, op=Average)`` (``allreduce_s``);
3. ``apply``: the optimizer update; for SGD, L2 weight decay is first added to the gradients of ≥ 2-D weights
   (coupled, as PyTorch's SGD does), LARS applies its own (``optimizer_s``).

Checkpoints hold NumPy arrays (pickled, no torch needed): model weights, optimizer variables, and what the
lifecycle adds (step, RNG streams, configuration). Random streams: Python's and NumPy's are saved per rank and
restored; TensorFlow's op seeds are set from the seed, the rank and the step at start.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Horovod needs tf.Variables (Keras 2), see README

from scaling import checkpoint as ckpt  # noqa: E402
from scaling.comm import TensorFlowCommunicator  # noqa: E402
from scaling.config import TrainConfig, usage_error  # noqa: E402
from scaling.framework import DeviceSummary, HostClock  # noqa: E402
from scaling.rank import RankInfo  # noqa: E402
from scaling.runplan import RunPlan  # noqa: E402


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


class TensorFlowTraining:
    """The :class:`scaling.framework.Framework` of TensorFlow runs."""

    name = "tensorflow"
    checkpoint_dump = staticmethod(ckpt.pickle_dump)
    checkpoint_load = staticmethod(ckpt.pickle_load)

    def __init__(self, config: TrainConfig) -> None:
        import tensorflow as tf

        self.config, self.tf = config, tf
        self.lr = 0.0
        self._summed: list[Any] | None = None
        self._reduced: list[Any] | None = None

    def preflight(self) -> None:
        from scaling.device import DeviceError, require_gpu_tensorflow

        if self.config.device == "cuda":
            try:
                require_gpu_tensorflow()
            except DeviceError as err:
                raise usage_error(str(err)) from None

    def setup(self, info: RankInfo) -> DeviceSummary:
        from scaling.device import DeviceError, setup_tensorflow

        c = self.config
        try:
            self.device_setup = setup_tensorflow(c.device, c.precision, c.threads, info.local_rank, info.local_size,
                                            c.deterministic, c.seed)
        except DeviceError as err:
            raise usage_error(f"rank {info.rank}: {err}", every_rank=True) from None
        return DeviceSummary(self.device_setup.device_name, self.device_setup.threads, dict(self.device_setup.details))

    def build(self, plan: RunPlan, comm: TensorFlowCommunicator) -> None:
        tf, c = self.tf, self.config
        self.accumulation = plan.batch.accumulation
        with tf.device(self.device_setup.device_name):
            tf.keras.utils.set_random_seed(c.seed)  # same initial weights everywhere (broadcast later anyway)
            model = build_keras_model(c.model, plan.num_classes, plan.image_size)
            optimizer = make_keras_optimizer(c, plan)
            optimizer.build(model.trainable_variables)
        self.model, self.optimizer = model, optimizer
        variables = model.trainable_variables
        decayed = [len(v.shape) > 1 for v in variables]
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        # LARS decays inside its update; SGD gets coupled L2 on the weights, as PyTorch's SGD does.
        weight_decay = plan.weight_decay if c.optimizer == "sgd" else 0.0

        @tf.function(reduce_retracing=True)
        def forward_backward(images: Any, labels: Any) -> Any:
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                loss = loss_fn(labels, tf.cast(logits, tf.float32))
            return loss, tape.gradient(loss, variables)

        @tf.function
        def average(grads: Any) -> Any:
            return comm.average(grads)

        @tf.function
        def apply(grads: Any, lr: Any) -> None:
            optimizer.learning_rate.assign(lr)
            grads = [g + weight_decay * v if d and weight_decay else g
                     for g, v, d in zip(grads, variables, decayed, strict=True)]
            optimizer.apply_gradients(zip(grads, variables, strict=True))

        self._forward_backward, self._average, self._apply = forward_backward, average, apply

    def checkpoint_bytes(self) -> int:
        weights = sum(w.nbytes for w in self.model.get_weights())
        return weights + sum(int(v.numpy().nbytes) for v in self.optimizer.variables)

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.model.set_weights(state["model"])
            for variable, value in zip(self.optimizer.variables, state["optimizer"], strict=True):
                variable.assign(value)

    def broadcast_state(self, comm: TensorFlowCommunicator, resumed: bool) -> None:
        comm.broadcast_variables(self.model.variables)
        comm.broadcast_variables(self.optimizer.variables)

    def seed_rng(self, seed: int, rank: int, start_step: int) -> None:
        import numpy as np

        random.seed(seed + rank)
        np.random.seed((seed + rank) % 2**32)
        self.tf.random.set_seed(seed * 1_000_003 + rank + 7919 * start_step)

    def rng_state(self) -> Any:
        import numpy as np

        return {"python": random.getstate(), "numpy": np.random.get_state()}

    def restore_rng(self, state: Any) -> None:
        import numpy as np

        random.setstate(state["python"])
        np.random.set_state(state["numpy"])

    def data(self, plan: RunPlan, spec: Any, rank: int, ranks: int, start_step: int) -> TFData:
        return TFData(self.config, plan, spec, rank, ranks)

    def clock(self) -> HostClock:
        return HostClock()

    def device_scope(self) -> contextlib.AbstractContextManager:
        return self.tf.device(self.device_setup.device_name)

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def forward_backward(self, images: Any, labels: Any, last: bool) -> Any:
        loss, grads = self._forward_backward(images, labels)
        summed = self._summed
        self._summed = list(grads) if summed is None else [a + g for a, g in zip(summed, grads, strict=True)]
        return loss

    def wait_gradients(self) -> float:
        summed, self._summed = self._summed, None
        if self.accumulation > 1:
            summed = [g / self.accumulation for g in summed]
        self._reduced = self._average(summed)
        _ = [g.numpy() for g in self._reduced[:1]]  # the allreduce is done once a result is readable
        return 0.0

    def apply(self) -> None:
        self._apply(self._reduced, self.tf.constant(self.lr, dtype=self.tf.float32))
        self._reduced = None

    def loss_value(self, losses: Sequence[Any]) -> float:
        total = 0.0
        for loss in losses:
            total += float(loss.numpy())
        return total / len(losses)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {"model": self.model.get_weights(), "optimizer": [v.numpy() for v in self.optimizer.variables]}

    def evaluate(self, batches: Iterator[tuple[Any, Any]]) -> list[float]:
        tf = self.tf
        counts = [0.0, 0.0, 0.0]
        for images, labels in batches:
            logits = tf.cast(self.model(images, training=False), tf.float32)
            top = tf.math.top_k(logits, k=min(5, logits.shape[1])).indices.numpy()
            hit = top == labels.numpy()[:, None]
            counts[0] += float(hit[:, 0].sum())
            counts[1] += float(hit.any(axis=1).sum())
            counts[2] += float(len(hit))
        return counts

    def describe(self) -> dict[str, Any]:
        return {}

    def versions(self) -> dict[str, str]:
        return {"tensorflow": self.tf.__version__}
