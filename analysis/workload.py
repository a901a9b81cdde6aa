"""What one training step of a network asks for, read from the per-layer tables of ``models.tables``.

The tables (``models/tables/<name>.csv``) list layers in the order their gradients become ready in the
backward pass, last layer first, with forward multiply-adds (MACs) and fp32 gradient bytes per layer. From
them, per image:

- forward FLOPs ``F_f = 2·Σ MACs``;
- backward FLOPs ``F_b = 2·Σ 2·MACs − 2·MACs(first layer)``: each layer computes the gradient with respect
  to its weights and to its input (two products the size of the forward one), except the network's first
  layer, whose input (the image) needs no gradient — frameworks skip it. So ``F_b ≈ 2·F_f`` and a training
  step is ≈ 3× the forward FLOPs, the usual rule (e.g. Kaplan et al. 2020, arXiv:2001.08361, section 2.1).

Gradient *events* drive the overlap model: walking the backward order, a layer's gradient is ready when the
backward work of every layer up to and including it is done; its ready time as a fraction of the backward
pass is the cumulative backward FLOPs so far over ``F_b``. Layers ready at the same fraction (a BatchNorm
whose backward the table counts as free, with the convolution before it in backward order) form one event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.roofline import LayerCost, layers_from_rows, traced_layers

IMAGENET_TRAIN_IMAGES = 1_281_167
MAX_EVENTS = 64


@dataclass(frozen=True)
class Workload:
    """A network's per-image costs and its gradient events in backward order."""

    model: str
    params: int
    forward_flops: float               # per image
    backward_flops: float              # per image
    gradient_bytes: float              # per step, what the allreduce moves
    activation_bytes: float            # per image, sum over layers' outputs (what the backward pass keeps)
    event_ready_fraction: np.ndarray   # fraction of the backward pass done when each event's gradients are ready
    event_bytes: np.ndarray            # gradient bytes of each event
    event_layers: tuple[tuple[str, ...], ...]
    # Per-layer costs in forward order for the roofline compute model (analysis/roofline.py): traced from the
    # architecture by load_workload, approximated from the rows by workload_from_rows.
    layers: tuple[LayerCost, ...] = ()

    @property
    def flops_per_image(self) -> float:
        return self.forward_flops + self.backward_flops

    @property
    def events(self) -> int:
        return len(self.event_bytes)


def workload_from_rows(model: str, rows, max_events: int = MAX_EVENTS,
                       layers: tuple[LayerCost, ...] | None = None) -> Workload:
    """Build a Workload from ``LayerRow``-like objects in backward order (last layer first).

    ``layers``: the roofline costs in forward order (default: approximated from the rows).
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"model {model!r} has an empty layer table")
    macs = np.array([float(r.macs) for r in rows])
    backward = 2.0 * 2.0 * macs
    backward[-1] = 2.0 * macs[-1]   # the first layer's input needs no gradient
    total_backward = float(backward.sum())
    cumulative = np.cumsum(backward) / (total_backward if total_backward > 0 else 1.0)
    fractions: list[float] = []
    sizes: list[float] = []
    names: list[list[str]] = []
    for row, done in zip(rows, cumulative, strict=True):
        if row.gradient_bytes <= 0:
            continue
        if fractions and np.isclose(done, fractions[-1], rtol=0, atol=1e-12):
            sizes[-1] += row.gradient_bytes
            names[-1].append(row.name)
        else:
            fractions.append(float(done))
            sizes.append(float(row.gradient_bytes))
            names.append([row.name])
    fractions, sizes, names = _cap_events(fractions, sizes, names, max_events)
    return Workload(
        model=model,
        params=int(sum(r.params for r in rows)),
        forward_flops=2.0 * float(macs.sum()),
        backward_flops=total_backward,
        gradient_bytes=float(sum(r.gradient_bytes for r in rows)),
        activation_bytes=float(sum(r.activation_bytes for r in rows)),
        event_ready_fraction=np.array(fractions),
        event_bytes=np.array(sizes),
        event_layers=tuple(tuple(n) for n in names),
        layers=layers if layers is not None else layers_from_rows(list(reversed(rows))),
    )


def _cap_events(fractions: list[float], sizes: list[float], names: list[list[str]], max_events: int):
    """Merge adjacent events until at most ``max_events`` remain (keeps the model's cost bounded).

    Merging event k into event k+1 treats k's gradients as ready slightly later (at k+1's time): a
    conservative error no larger than the backward time between them. The pair merged each time is the
    one closest together in ready time.
    """
    while len(fractions) > max_events:
        gaps = np.diff(fractions)
        k = int(np.argmin(gaps))
        sizes[k + 1] += sizes[k]
        names[k + 1] = names[k] + names[k + 1]
        del fractions[k], sizes[k], names[k]
    return fractions, sizes, names


def load_workload(model: str, image_size: int | None = None, num_classes: int = 1000,
                  max_events: int = MAX_EVENTS) -> Workload:
    """The workload of a registered model; unknown names raise ValueError listing the known ones.

    At the native input size and 1000 classes it reads the packaged table (``models.tables.load_table``);
    other sizes (e.g. 32-pixel test runs) or class counts are computed by ``models.tables.layer_table``.
    Both are pure python: no torch or tensorflow behind them.
    """
    from models.tables import layer_table, load_table

    if image_size is None and num_classes == 1000:
        rows = load_table(model)
    else:
        rows = layer_table(model, image_size=image_size, num_classes=num_classes)
    return workload_from_rows(model, rows, max_events=max_events,
                              layers=traced_layers(model, image_size, num_classes))
