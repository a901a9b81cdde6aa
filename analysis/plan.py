"""Capacity planning: which nodes and batch, for how many node-hours, reach an accuracy (or epochs) by when.

Candidates are every (nodes, global batch) pair of the grid below that the machine can hold:

- nodes: powers of two up to ``max_nodes`` (the machine's limit unless lower), plus ``max_nodes`` itself;
- global batch: with a target accuracy, the powers of two inside the batch ranges of the network's seed tables
  (every augmentation regime's: time-to-accuracy does not extrapolate), and every batch those tables hold;
  with fixed epochs, powers of two from 256 to 32K, the range the LARS results cover; ``batches`` overrides
  either;
- the batch must divide evenly over the ranks, and the per-rank memory estimate must fit.

For each, the epochs come from :func:`analysis.accuracy.epochs_to_accuracy` (the fewest over the network's
augmentation regimes, the row saying which; or they are given), the time from
:func:`analysis.predict.predict_from` (one vectorised call for the whole grid). A job may run at most the
walltime limit ``W``; a longer training is a checkpoint/restart chain of ``⌈T / (W − o)⌉`` jobs, each paying a
restart overhead ``o`` (start-up, reading the checkpoint), so the wall time is ``T + jobs·o`` (queue waits
excluded) and the cost ``nodes · (T + jobs·o)`` node-hours. Candidates over the node-hour budget or the deadline
are dropped. The rest are ranked by wall time, then cost; the Pareto front is the set no other candidate beats
on both time and node-hours. Every row also carries the ends of the prediction's 90 % interval
(``predict``'s ``time_to_train_s_low``/``_high``) as time to train, wall time and node-hours, each end with its
own restart chain (the budget and the deadline judge the central figure).

Memory per rank (estimate): weights, gradients, momentum and a fusion buffer ``4 × gradient_bytes``, plus
twice the activations of ``b`` images (outputs kept for the backward pass and their gradients). It is
checked against the device memory of a GPU rank, or the node memory shared by a CPU node's ranks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.accuracy import AccuracyError, epochs_to_accuracy, tables_for
from analysis.params import PerfParams
from analysis.predict import predict_from, resolve_machine
from analysis.workload import IMAGENET_TRAIN_IMAGES, load_workload
from larscale.machine import MachineProfile, walltime_seconds

DEFAULT_BATCHES = tuple(2**k for k in range(8, 16))   # 256 .. 32K


@dataclass(frozen=True)
class PlanRow:
    nodes: int
    ranks_per_node: int
    global_batch: int
    batch_per_rank: int
    epochs: float
    epochs_bound: str            # "given", "exact", "interpolated" or "at_most" (see analysis.accuracy)
    iteration_s: float
    comm_exposed_s: float
    scaling_efficiency: float
    time_to_train_s: float       # pure training time
    jobs: int                    # checkpoint/restart chain length under the walltime limit
    wall_s: float                # time_to_train_s + jobs × restart overhead
    node_hours: float
    memory_gb_per_rank: float
    pareto: bool = False
    augmentation: str = ""       # the seed table's data-augmentation regime the epochs come from ("" if given)
    # The ends of the prediction's 90 % interval (analysis.predict), each end with its own restart chain.
    node_hours_low: float = math.nan
    node_hours_high: float = math.nan
    time_to_train_s_low: float = math.nan
    time_to_train_s_high: float = math.nan
    wall_s_low: float = math.nan
    wall_s_high: float = math.nan

    @property
    def label(self) -> str:
        return f"{self.nodes}n B={self.global_batch}"


@dataclass(frozen=True)
class AllocationPlan:
    model: str
    machine: str
    target_top1: float | None
    rows: list[PlanRow]                      # feasible, ranked by wall time then node-hours
    rejected: dict[str, int]                 # reason → candidates dropped
    max_walltime_s: float
    restart_overhead_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def front(self) -> list[PlanRow]:
        return [r for r in self.rows if r.pareto]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "target_top1": self.target_top1,
                "max_walltime_s": self.max_walltime_s, "restart_overhead_s": self.restart_overhead_s,
                "rejected": self.rejected, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows[:top]], "pareto_front": [asdict(r) for r in self.front]}


def pareto_mask(time: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True where no other point is at least as good on both and better on one (minimising both)."""
    time, cost = np.asarray(time, float), np.asarray(cost, float)
    order = np.lexsort((cost, time))
    mask = np.zeros(time.size, dtype=bool)
    best_cost = math.inf
    for i in order:
        if cost[i] < best_cost:
            mask[i] = True
            best_cost = cost[i]
    return mask


def memory_gb_per_rank(workload, batch_per_rank) -> np.ndarray:
    return (4 * workload.gradient_bytes + 2 * np.asarray(batch_per_rank, float) * workload.activation_bytes) / 1e9


def memory_limit_gb(machine: MachineProfile, ranks_per_node: int) -> float:
    devices = machine.node.devices
    if devices.kind == "gpu" and devices.memory_gb:
        return devices.memory_gb * devices.count / ranks_per_node
    return machine.node.memory_gb / ranks_per_node


def _node_grid(max_nodes: int) -> list[int]:
    nodes = [2**k for k in range(0, 31) if 2**k <= max_nodes]
    return nodes + ([max_nodes] if max_nodes not in nodes else [])


def plan(model: str, machine: str | Path | MachineProfile, target_top1: float | None = None,
         epochs: float | None = None, budget_node_hours: float | None = None, max_nodes: int | None = None,
         max_walltime: str | float | None = None, deadline: str | float | None = None,
         ranks_per_node: int | None = None, batches: list[int] | None = None, restart_overhead_s: float = 120.0,
         dataset_size: int = IMAGENET_TRAIN_IMAGES, params: PerfParams | None = None) -> AllocationPlan:
    """Rank the feasible configurations (see the module docstring). ValueError for impossible questions."""
    if (target_top1 is None) == (epochs is None):
        raise ValueError("give exactly one of target_top1 and epochs")
    if epochs is not None and not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs!r}")
    profile = resolve_machine(machine)
    params = params or PerfParams.from_machine(profile)
    workload = load_workload(model)
    limit = profile.limits.max_nodes
    if max_nodes is not None:
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        if max_nodes > limit:
            raise ValueError(f"max_nodes {max_nodes} is beyond machine {profile.name!r} (max_nodes {limit})")
        limit = max_nodes
    walltime_s = _seconds(max_walltime, "max_walltime") if max_walltime is not None else profile.limits.max_walltime_s
    if walltime_s <= restart_overhead_s:
        raise ValueError(f"max_walltime {walltime_s:g} s leaves no time after the restart overhead "
                         f"({restart_overhead_s:g} s)")
    deadline_s = _seconds(deadline, "deadline") if deadline is not None else math.inf
    rpn = ranks_per_node or profile.default_ranks_per_node
    notes: list[str] = []
    if batches is None:
        if target_top1 is not None:
            batches, ranges = [], []
            for table in tables_for(model):
                known = [r.batch for r in table.known_rows]
                batches += [b for b in DEFAULT_BATCHES + tuple(known) if min(known) <= b <= max(known)]
                ranges.append(f"{table.network} ({table.augmentation} augmentation) {min(known)}..{max(known)}")
            notes.append("batches limited to the seed tables' ranges: " + ", ".join(ranges)
                         + " (time-to-accuracy does not extrapolate)")
        else:
            batches = list(DEFAULT_BATCHES)
    batches = sorted(set(int(b) for b in batches))
    rejected: dict[str, int] = {}

    def reject(reason: str, count: int = 1) -> None:
        rejected[reason] = rejected.get(reason, 0) + count

    epochs_of: dict[int, tuple[float, str, str]] = {}
    for b in batches:
        if target_top1 is None:
            epochs_of[b] = (float(epochs), "given", "")
            continue
        try:
            answer = epochs_to_accuracy(model, b, target_top1)
        except AccuracyError as err:
            if "above every value" in str(err):
                raise
            reject(f"target not reached at this batch in the seed tables ({err})", len(_node_grid(limit)))
            continue
        epochs_of[b] = (answer.epochs, answer.bound, answer.augmentation)
    if not epochs_of:
        raise ValueError(f"no batch reaches top-1 {target_top1}% in the seed tables: " + "; ".join(rejected))

    grid_nodes, grid_batch = [], []
    for b in epochs_of:
        for n in _node_grid(limit):
            if b % (n * rpn):
                reject("global batch not divisible by the ranks")
                continue
            grid_nodes.append(n)
            grid_batch.append(b)
    if not grid_nodes:
        raise ValueError("no (nodes, batch) pair divides evenly: "
                         + ", ".join(f"{k}: {v}" for k, v in rejected.items()))
    nodes_a, batch_a = np.array(grid_nodes), np.array(grid_batch)
    epochs_a = np.array([epochs_of[b][0] for b in grid_batch])
    pred = predict_from(workload, params, nodes_a, batch_a, epochs_a, rpn, dataset_size)
    memory = memory_gb_per_rank(workload, pred.batch_per_rank)
    memory_limit = memory_limit_gb(profile, rpn)
    # The queue's walltime for each point's job size (node-count bins), unless the caller fixed one.
    walltime_of = (np.full(nodes_a.size, walltime_s) if max_walltime is not None else
                   np.array([min(walltime_s, profile.max_walltime_for(int(n))[0]) for n in nodes_a], dtype=float))
    jobs = chain_jobs(pred.time_to_train_s, walltime_of, restart_overhead_s)
    wall = pred.time_to_train_s + jobs * restart_overhead_s
    node_hours = nodes_a * wall / 3600
    # The same at the interval's ends: a slower run may need a longer restart chain.
    ends = {}
    for end, train_s in (("low", pred.time_to_train_s_low), ("high", pred.time_to_train_s_high)):
        chain = chain_jobs(train_s, walltime_of, restart_overhead_s)
        ends[end] = {"time_to_train_s": train_s, "wall_s": train_s + chain * restart_overhead_s}
        ends[end]["node_hours"] = nodes_a * ends[end]["wall_s"] / 3600
    rows = []
    for i in range(nodes_a.size):
        if memory[i] > memory_limit:
            reject(f"memory estimate over {memory_limit:.0f} GB per rank")
            continue
        if budget_node_hours is not None and node_hours[i] > budget_node_hours:
            reject("over the node-hour budget")
            continue
        if wall[i] > deadline_s:
            reject("past the deadline")
            continue
        rows.append(PlanRow(
            nodes=int(nodes_a[i]), ranks_per_node=int(rpn), global_batch=int(batch_a[i]),
            batch_per_rank=int(pred.batch_per_rank[i]), epochs=float(epochs_a[i]),
            epochs_bound=epochs_of[int(batch_a[i])][1], iteration_s=float(pred.iteration_s[i]),
            comm_exposed_s=float(pred.comm_exposed_s[i]), scaling_efficiency=float(pred.scaling_efficiency[i]),
            time_to_train_s=float(pred.time_to_train_s[i]), jobs=int(jobs[i]), wall_s=float(wall[i]),
            node_hours=float(node_hours[i]), memory_gb_per_rank=float(memory[i]),
            augmentation=epochs_of[int(batch_a[i])][2],
            **{f"{key}_{end}": float(ends[end][key][i]) for end in ends for key in ends[end]}))
    if not rows:
        raise ValueError("no configuration fits: " + ", ".join(f"{k}: {v}" for k, v in rejected.items()))
    mask = pareto_mask([r.wall_s for r in rows], [r.node_hours for r in rows])
    rows = [PlanRow(**{**asdict(r), "pareto": bool(m)}) for r, m in zip(rows, mask, strict=True)]
    rows.sort(key=lambda r: (r.wall_s, r.node_hours))
    return AllocationPlan(model=model, machine=profile.name, target_top1=target_top1, rows=rows, rejected=rejected,
                max_walltime_s=walltime_s, restart_overhead_s=restart_overhead_s, notes=notes)


def chain_jobs(train_s, walltime_s, restart_overhead_s: float):
    """Jobs of a checkpoint/restart chain, ``⌈T / (W − o)⌉`` and at least one (``W − o`` at least a second);
    elementwise over arrays of training times and walltime limits."""
    return np.maximum(np.ceil(np.asarray(train_s) / np.maximum(np.asarray(walltime_s) - restart_overhead_s, 1.0)), 1)


def _seconds(value: str | float, name: str) -> float:
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        return float(value)
    try:
        return float(walltime_seconds(value))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def format_plan(result: AllocationPlan, top: int = 15) -> str:
    """A text table of the ranked candidates (Pareto-optimal ones starred) and what was dropped."""
    head = (f"{'':1} {'nodes':>6} {'batch':>6} {'b/rank':>6} {'epochs':>7} {'iter s':>8} {'eff':>5} "
            f"{'train h':>8} {'90 % train h':>13} {'jobs':>4} {'wall h':>7} {'90 % wall h':>13} {'node-h':>9} "
            f"{'90 % node-h':>13} {'mem GB':>7}  augmentation")
    lines = [f"plan for {result.model} on {result.machine}"
             + (f", target top-1 {result.target_top1:g}%" if result.target_top1 is not None else "")
             + f"; walltime limit {result.max_walltime_s / 3600:g} h, restart overhead {result.restart_overhead_s:g} s",
             head]
    for r in result.rows[:top]:
        epochs = f"{r.epochs:.0f}" + ("≤" if r.epochs_bound == "at_most" else "")
        lines.append(f"{'*' if r.pareto else ' '} {r.nodes:>6} {r.global_batch:>6} {r.batch_per_rank:>6} "
                     f"{epochs:>7} {r.iteration_s:>8.3f} {r.scaling_efficiency:>5.2f} "
                     f"{r.time_to_train_s / 3600:>8.2f} "
                     f"{_band(r.time_to_train_s_low / 3600, r.time_to_train_s_high / 3600)} "
                     f"{r.jobs:>4} {r.wall_s / 3600:>7.2f} {_band(r.wall_s_low / 3600, r.wall_s_high / 3600)} "
                     f"{r.node_hours:>9.1f} {_band(r.node_hours_low, r.node_hours_high, 0)} "
                     f"{r.memory_gb_per_rank:>7.1f}  {r.augmentation or '-'}")
    lines.append(f"{len(result.rows)} feasible; * = Pareto front (time vs node-hours), {len(result.front)} points; "
                 "≤ = at most this many epochs (the tables hold no shorter run); 90 %: the prediction's interval")
    for reason, count in result.rejected.items():
        lines.append(f"dropped {count}: {reason}")
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


def _band(low: float, high: float, digits: int = 2) -> str:
    """An interval as one right-aligned table cell, ``low-high``."""
    return f"{f'{low:.{digits}f}-{high:.{digits}f}':>13}"


def check_sweep_spec(result: AllocationPlan, machine: str, max_nodes: int = 4, steps: int = 100, top: int = 3,
                     threads_per_rank: int | None = None, precision: str = "fp32",
                     compiled: bool = False) -> dict[str, Any]:
    """A sweep spec (jobs/spec.py's format) that checks the plan's chosen configurations at small scale.

    The chosen configurations are the first ``top`` of the Pareto front (fastest first). A weak sweep at their
    batch per rank and ranks per node (the fastest one's when they differ: one spec is one sweep) over 1, 2, 4 …
    nodes up to ``max_nodes`` (and the largest chosen node count) measures what the plan assumed at that
    per-rank load: `larscale report` on it calibrates the profile and projects back to the chosen scale.
    ``machine``: the profile as the plan was given it (bundled name or YAML path); ``threads_per_rank``: the
    node's cores shared by its ranks, as the plan's runs would use them. ``precision`` and ``compiled``: the
    arithmetic and the compute mode the plan assumed, so that the check measures the steps it priced (the trainer's
    own default precision can differ from the plan's).
    """
    if max_nodes < 1 or steps < 1:
        raise ValueError(f"max_nodes and steps must be >= 1, got {max_nodes} and {steps}")
    chosen = result.front[:top] or result.rows[:1]
    first = chosen[0]
    largest = min(max_nodes, max(r.nodes for r in chosen))
    nodes = _node_grid(largest)
    configurations = ", ".join(f"{r.nodes} nodes x {r.ranks_per_node} ranks, global batch {r.global_batch} "
                               f"({r.batch_per_rank} per rank)" for r in chosen)
    return {
        "name": f"{result.model}-check-b{first.batch_per_rank}",
        "description": f"larscale plan's choice for {result.model} on {result.machine} ({configurations}) checked "
                       f"at small scale: weak scaling at {first.batch_per_rank} images per rank; then `larscale "
                       "report` on this sweep calibrates the profile and projects to the chosen scale",
        "model": result.model, "framework": "torch", "dataset": "synthetic", "machine": machine,
        "sweep": {"kind": "weak", "nodes": nodes, "ranks_per_node": first.ranks_per_node,
                  "batch_per_rank": first.batch_per_rank,
                  **({"threads_per_rank": threads_per_rank} if threads_per_rank else {})},
        "training": {"steps": steps, "optimizer": "lars", "precision": precision,
                     "extra_args": ["--no-eval", *(["--compile"] if compiled else [])]},
    }
