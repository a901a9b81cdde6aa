"""LARS for TensorFlow 2: the same defaults and math as ``scaling.optim.LARS`` (see its docstring).

For every variable w with gradient g, global rate γ_t, trust coefficient η, weight decay β, momentum m::

    local_lr = η·‖w‖ / (‖g‖ + β·‖w‖)    if ‖w‖ > 0 and ‖g‖ > 0, else 1      (min(local_lr, 1) with clip=True)
    v ← m·v + γ_t·local_lr·(g + β·w)
    w ← w − v

‖g‖ is the raw gradient's norm (give the optimizer the unregularised gradient: weight decay is applied here, once).
Variables with rank ≤ 1 (biases, BatchNorm) when ``exclude_1d``, and variables whose name contains one of
``exclude_names``, get neither the trust ratio nor weight decay: v ← m·v + γ_t·g.

Two classes share the update (``lars_update``):

* ``KerasLARS``: a ``tf.keras.optimizers.Optimizer`` (tf-keras / Keras 2, which larscale selects with
  ``TF_USE_LEGACY_KERAS=1``): ``model.compile(optimizer=...)``, ``apply_gradients(zip(grads, vars))`` in a custom
  loop (with ``hvd.DistributedGradientTape``), ``hvd.DistributedOptimizer`` (needs get_config/from_config),
  ``optimizer.variables`` for ``hvd.broadcast_variables`` and checkpoints.
* ``LARSModule``: a plain ``tf.Module`` with the same constructor, ``learning_rate`` variable, ``build``,
  ``apply_gradients`` and ``variables``, for custom loops where Keras 2 is not available.

``LARS`` is ``KerasLARS`` when ``tf.keras`` is Keras 2, else ``LARSModule``.
The velocity is stored as is here (one slot per variable): TensorFlow fuses the per-variable update inside its
graph; ``scaling.optim.LARS`` is PyTorch's readable reference, ``scaling.optim_fast.FastLARS`` its fast one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported: Keras 2 variables for Horovod

import tensorflow as tf  # noqa: E402

__all__ = ["LARS", "KerasLARS", "LARSModule", "lars_update", "uses_trust_ratio"]


def _check(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"LARS {name} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"LARS {name} must be in {interval}, got {value!r}")
    return float(value)


def _validated(momentum: float, weight_decay: float, trust_coefficient: float,
               exclude_names: Sequence[str]) -> tuple[float, float, float, tuple[str, ...]]:
    if isinstance(exclude_names, str):
        raise ValueError(f"LARS exclude_names must be a list of name fragments, got the string {exclude_names!r}")
    return (_check("momentum", momentum, 0.0, 1.0, high_open=True), _check("weight_decay", weight_decay, 0.0),
            _check("trust_coefficient", trust_coefficient, 0.0, low_open=True), tuple(exclude_names))


def uses_trust_ratio(variable: tf.Variable, exclude_1d: bool = True, exclude_names: Sequence[str] = ()) -> bool:
    """Whether ``variable`` gets the trust ratio and weight decay (else plain momentum SGD)."""
    if exclude_1d and len(variable.shape) <= 1:
        return False
    return not any(fragment in variable.name for fragment in exclude_names)


def lars_update(variable: tf.Variable, gradient: Any, velocity: tf.Variable | None, learning_rate: Any,
                momentum: float, weight_decay: float, trust_coefficient: float, clip: bool,
                trust_ratio: bool) -> None:
    """Apply one LARS step to ``variable`` (graph or eager). ``velocity`` may be None when momentum is 0."""
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)  # the trust ratio needs the whole gradient's norm
    dtype = variable.dtype
    lr = tf.cast(learning_rate, dtype)
    if trust_ratio:
        w_norm = tf.norm(variable)
        g_norm = tf.norm(gradient)
        ratio = tf.where((w_norm > 0) & (g_norm > 0),
                         trust_coefficient * w_norm / (g_norm + weight_decay * w_norm), tf.ones([], dtype))
        if clip:
            ratio = tf.minimum(ratio, tf.ones([], dtype))
        step = (lr * ratio) * (gradient + weight_decay * variable)
    else:
        step = lr * gradient
    if velocity is None or momentum == 0:
        variable.assign_sub(step)
        return
    velocity.assign(momentum * velocity + step)
    variable.assign_sub(velocity)


class LARSModule(tf.Module):
    """LARS as a plain ``tf.Module`` for custom training loops (no Keras needed).

    ``learning_rate`` is a float variable (assign the schedule's value each step), ``iterations`` counts
    ``apply_gradients`` calls, ``variables`` lists [iterations, velocities...] in ``build`` order.
    """

    def __init__(self, learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False, exclude_1d: bool = True,
                 exclude_names: Sequence[str] = (), name: str = "LARS") -> None:
        super().__init__(name=name)
        _check("learning_rate", learning_rate, 0.0)
        self.momentum, self.lars_weight_decay, self.trust_coefficient, self.exclude_names = _validated(
            momentum, weight_decay, trust_coefficient, exclude_names)
        self.clip, self.exclude_1d = bool(clip), bool(exclude_1d)
        with tf.init_scope():
            self.learning_rate = tf.Variable(float(learning_rate), dtype=tf.float32, trainable=False,
                                             name="learning_rate")
            self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self._slots: dict[Any, tf.Variable] = {}
        self._order: list[tf.Variable] = []

    def build(self, var_list: Iterable[tf.Variable]) -> None:
        """Create the velocity slots (zeros) of ``var_list``; later calls add only new variables."""
        with tf.init_scope():
            for var in var_list:
                if var.ref() in self._slots:
                    continue
                slot = tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                   name=var.name.split(":")[0].replace("/", "_") + "_velocity")
                self._slots[var.ref()] = slot
                self._order.append(slot)

    @property
    def variables(self) -> list[tf.Variable]:  # type: ignore[override]
        return [self.iterations, *self._order]

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, tf.Variable]]) -> None:
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        self.build([v for _, v in pairs])
        for grad, var in pairs:
            lars_update(var, grad, self._slots[var.ref()], self.learning_rate, self.momentum,
                        self.lars_weight_decay, self.trust_coefficient, self.clip,
                        uses_trust_ratio(var, self.exclude_1d, self.exclude_names))
        self.iterations.assign_add(1)

    def velocity(self, variable: tf.Variable) -> tf.Variable:
        return self._slots[variable.ref()]


def _is_keras2() -> bool:
    version = getattr(tf.keras, "__version__", "")
    return not version.startswith("3") and hasattr(tf.keras.optimizers, "Optimizer") and hasattr(
        tf.keras.optimizers.Optimizer, "add_variable_from_reference")


if _is_keras2():

    class KerasLARS(tf.keras.optimizers.Optimizer):
        """LARS as a tf-keras (Keras 2) optimizer; weight decay is LARS's own (the base class gets none)."""

        def __init__(self, learning_rate: Any, momentum: float = 0.9, weight_decay: float = 0.0,
                     trust_coefficient: float = 0.001, clip: bool = False, exclude_1d: bool = True,
                     exclude_names: Sequence[str] = (), name: str = "LARS", jit_compile: bool = False,
                     **kwargs: Any) -> None:
            kwargs.pop("is_legacy_optimizer", None)
            kwargs.pop("weight_decay", None)
            # jit_compile off by default: XLA compiles one kernel per variable shape, which costs more than it
            # saves on CPU.
            super().__init__(name=name, weight_decay=None, jit_compile=jit_compile, **kwargs)
            if isinstance(learning_rate, (int, float)):
                _check("learning_rate", learning_rate, 0.0)
            self._learning_rate = self._build_learning_rate(learning_rate)
            self.momentum, self.lars_weight_decay, self.trust_coefficient, self.exclude_names = _validated(
                momentum, weight_decay, trust_coefficient, exclude_names)
            self.clip, self.exclude_1d = bool(clip), bool(exclude_1d)

        def build(self, var_list: Sequence[tf.Variable]) -> None:
            super().build(var_list)
            if getattr(self, "_built", False):
                return
            self.velocities = [self.add_variable_from_reference(model_variable=var, variable_name="velocity")
                               for var in var_list]
            self._built = True

        def update_step(self, gradient: Any, variable: tf.Variable) -> None:
            velocity = self.velocities[self._index_dict[self._var_key(variable)]]
            lars_update(variable, gradient, velocity, self.learning_rate, self.momentum, self.lars_weight_decay,
                        self.trust_coefficient, self.clip,
                        uses_trust_ratio(variable, self.exclude_1d, self.exclude_names))

        def velocity(self, variable: tf.Variable) -> tf.Variable:
            return self.velocities[self._index_dict[self._var_key(variable)]]

        def get_config(self) -> dict[str, Any]:
            config = super().get_config()
            learning_rate = self._serialize_hyperparameter(self._learning_rate)
            config.update({
                "learning_rate": learning_rate if isinstance(learning_rate, dict) else float(learning_rate),
                "momentum": self.momentum, "weight_decay": self.lars_weight_decay,
                "trust_coefficient": self.trust_coefficient, "clip": self.clip, "exclude_1d": self.exclude_1d,
                "exclude_names": list(self.exclude_names),
            })
            return config

    LARS: type = KerasLARS
else:  # pragma: no cover - larscale always runs with tf-keras
    KerasLARS = None  # type: ignore[assignment,misc]
    LARS = LARSModule
