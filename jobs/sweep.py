"""A sweep spec + a machine profile → the list of points to run, their walltimes and what they cost.

Point expansion (N = nodes, R = ranks per node, p = N·R ranks):

- ``strong``: global batch B fixed, batch per rank b = B / p (B must divide evenly: ranks cannot take
  fractional images);
- ``weak``: b fixed, B = b · p;
- ``grid``: every N × every B, b = B / p.

Walltime of a point: the user's ``job.walltime``, or ``(T_pred + startup_s) · walltime_margin`` rounded up to
a whole minute, where ``T_pred`` is the analysis model's prediction (``iteration_s · steps`` or
``time_to_train_s`` for epochs). Cost: node-hours = N · walltime / 3600 summed over points (an upper bound:
what the scheduler charges when every job runs to its limit). Points over the queue limits (nodes or
walltime), and points the model cannot predict without a ``job.walltime``, are refused one by one with the
reason and never submitted; the other points plan as usual.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jobs.spec import SweepSpec, load_spec, parse_spec
from larscale.machine import MachineProfile, format_walltime, load_machine, walltime_seconds
from larscale.schema import SchemaError

# The trainer's command: `larscale train` == `python -m scaling.train`.
TRAIN_MODULE = "scaling.train"


@dataclass(frozen=True)
class Point:
    """One training run of the sweep."""

    point_id: str
    nodes: int
    ranks_per_node: int
    threads_per_rank: int
    global_batch: int
    batch_per_rank: int
    repetition: int
    seed: int
    lr: float | None
    walltime_s: int
    walltime_source: str            # "user" | "predicted" | "none" (refused before a walltime was known)
    predicted_s: float | None       # the model's time for the run itself, before margin and startup
    refused: str | None = None      # why the point cannot be submitted (queue limits), else None

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def node_hours(self) -> float:
        return self.nodes * self.walltime_s / 3600.0

    @property
    def walltime(self) -> str:
        return format_walltime(self.walltime_s)

    def params(self) -> dict[str, Any]:
        return {"point_id": self.point_id, "nodes": self.nodes, "ranks_per_node": self.ranks_per_node,
                "ranks": self.ranks, "threads_per_rank": self.threads_per_rank,
                "global_batch": self.global_batch, "batch_per_rank": self.batch_per_rank,
                "repetition": self.repetition, "seed": self.seed, "lr": self.lr,
                "walltime_s": self.walltime_s, "walltime_source": self.walltime_source,
                "predicted_s": self.predicted_s}


@dataclass(frozen=True)
class Plan:
    spec: SweepSpec
    machine: MachineProfile
    output_dir: Path
    points: list[Point] = field(default_factory=list)
    python: str = sys.executable
    # Further words of job.python given as a list (["conda", "run", "-n", "ml", "python"]: python is "conda").
    python_args: tuple[str, ...] = ()

    @property
    def python_words(self) -> list[str]:
        """The command that starts the interpreter on the cluster (one or more words)."""
        return [self.python, *self.python_args]

    @property
    def on_gpus(self) -> bool:
        return self.machine.node.devices.kind == "gpu" and (self.spec.training.device or "cuda") == "cuda"

    @property
    def precision(self) -> str:
        """training.precision, else bf16 where the profile's device has a bf16 peak (GPUs), else fp32."""
        return self.spec.training.precision or default_precision(self.machine)

    def gpus_per_node(self, ranks_per_node: int) -> int:
        """GPUs a job asks for per node: job.gpus_per_node, else one per rank on a GPU profile, else none."""
        if self.spec.job.gpus_per_node is not None:
            return self.spec.job.gpus_per_node
        return ranks_per_node if self.on_gpus else 0

    def workers(self, point: Point) -> int | None:
        """Loader processes per rank: training.workers, else on GPUs the rank's cores but the training loop's."""
        if self.spec.training.workers is not None:
            return self.spec.training.workers
        return max(1, point.threads_per_rank - 1) if self.on_gpus else None

    @property
    def accepted(self) -> list[Point]:
        return [p for p in self.points if p.refused is None]

    @property
    def refused(self) -> list[Point]:
        return [p for p in self.points if p.refused is not None]

    @property
    def node_hours(self) -> float:
        return sum(p.node_hours for p in self.accepted)

    def point(self, point_id: str) -> Point:
        for p in self.points:
            if p.point_id == point_id:
                return p
        raise KeyError(point_id)

    def run_dir(self, point: Point) -> Path:
        return self.output_dir / "runs" / point.point_id

    def train_argv(self, point: Point, resume: bool = False) -> list[str]:
        """The trainer command of one point (interpreter first); every element is one shell word."""
        t = self.spec.training
        argv = [*self.python_words, "-m", TRAIN_MODULE, "--model", self.spec.model, "--framework", self.spec.framework,
                "--dataset", self.spec.dataset, "--global-batch", str(point.global_batch)]
        argv += ["--steps", str(t.steps)] if t.steps is not None else ["--epochs", _num(t.epochs)]
        argv += ["--optimizer", t.optimizer]
        if t.lr_preset:
            argv.append("--lr-preset")
        elif point.lr is not None:
            argv += ["--lr", _num(point.lr)]
        for flag, value in (("--warmup-steps", t.warmup_steps), ("--warmup-epochs", t.warmup_epochs),
                            ("--end-lr", t.end_lr), ("--schedule", t.schedule), ("--accumulation", t.accumulation),
                            ("--image-size", t.image_size), ("--num-classes", t.num_classes),
                            ("--checkpoint-every", t.checkpoint_every), ("--keep", t.keep),
                            ("--log-every", t.log_every)):
            if value is not None:
                argv += [flag, _num(value) if isinstance(value, float) else str(value)]
        argv += ["--device", t.device or ("cuda" if self.machine.node.devices.kind == "gpu" else "cpu"),
                 "--precision", self.precision, "--threads", str(point.threads_per_rank), "--seed", str(point.seed),
                 "--out", str(self.run_dir(point))]
        workers = self.workers(point)
        if workers is not None:
            argv += ["--workers", str(workers)]
        argv += list(t.extra_args)
        if resume:
            argv.append("--resume")
        return argv


def default_precision(machine: MachineProfile) -> str:
    """bf16 on a GPU that has it (its profile lists a bf16 peak), else fp32."""
    devices = machine.node.devices
    return "bf16" if devices.kind == "gpu" and "bf16" in devices.peak_tflops else "fp32"


def default_threads(machine: MachineProfile, ranks_per_node: int) -> int:
    """Cores per rank when the spec gives none: a GPU node's cores divided among its ranks, else 1."""
    if machine.node.devices.kind == "gpu":
        return max(1, machine.node.cores // ranks_per_node)
    return 1


def _num(value: float | None) -> str:
    """A float as the shortest text that parses back to it (``2.0`` → ``2``)."""
    assert value is not None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def point_id(nodes: int, ranks: int, global_batch: int, repetition: int, repetitions: int) -> str:
    base = f"n{nodes}-p{ranks}-b{global_batch}"
    return f"{base}-rep{repetition}" if repetitions > 1 else base


def _predictor():
    """``analysis.predict.predict_point`` when the analysis package provides it, else None."""
    try:
        from analysis.predict import predict_point
    except ImportError:
        return None
    return predict_point


def predict_seconds(spec: SweepSpec, machine: MachineProfile, nodes: int, ranks_per_node: int,
                    global_batch: int) -> float | None:
    """The analysis model's time for one run (seconds), or None when no prediction is available.

    Steps: ``iteration_s · steps``; epochs: ``time_to_train_s`` (ImageNet-1k epochs). The model predicts at the
    network's native image size, so a run at a smaller ``image_size`` gets a generous (longer) walltime.
    """
    predict_point = _predictor()
    if predict_point is None:
        return None
    t = spec.training
    try:
        result = predict_point(model=spec.model, machine=machine, nodes=nodes, global_batch=global_batch,
                               epochs=t.epochs if t.epochs is not None else 1.0, ranks_per_node=ranks_per_node,
                               precision=t.precision or default_precision(machine))
    except ValueError as err:
        raise SchemaError("job.walltime", f"the walltime prediction failed ({err}): give job.walltime") from None
    seconds = float(result["iteration_s"]) * t.steps if t.steps is not None else float(result["time_to_train_s"])
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def plan(spec: SweepSpec | str | Path | dict, machine: MachineProfile | str | Path | None = None,
         output_dir: str | Path | None = None, python: str | list[str] | None = None) -> Plan:
    """Expand a spec into points with walltimes and costs (see the module docstring).

    ``spec`` may be a SweepSpec, a YAML path or a mapping; ``machine`` overrides the spec's profile.
    Raises SchemaError (a ValueError) naming the field when the spec cannot work on this machine at all
    (unknown machine, batch not divisible by the ranks); points over the queue limits, or that the model
    cannot predict, are kept but refused, each with its reason.
    """
    if isinstance(spec, dict):
        spec = parse_spec(spec)
    elif not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    if not isinstance(machine, MachineProfile):
        try:
            machine = load_machine(machine if machine is not None else spec.machine)
        except SchemaError as err:
            raise SchemaError("machine", err.reason if not err.path else str(err), err.source) from None
    from jobs.schedulers import SCHEDULERS, get_scheduler

    if machine.scheduler not in SCHEDULERS:
        raise SchemaError("machine.scheduler", f"unknown scheduler {machine.scheduler!r}; choose one of "
                          f"{', '.join(SCHEDULERS)}")
    runs_here = get_scheduler(machine.scheduler).runs_here
    sweep = spec.sweep
    rpn_values = sweep.ranks_per_node or [machine.default_ranks_per_node]
    threads = {r: sweep.threads_per_rank or default_threads(machine, r) for r in rpn_values}
    for i, ranks_per_node in enumerate(rpn_values):
        where = f"sweep.ranks_per_node[{i}]" if sweep.ranks_per_node else "machine.ranks_per_node"
        if machine.node.devices.kind == "gpu" and ranks_per_node > machine.devices_per_node:
            raise SchemaError(where, f"{ranks_per_node} ranks per node but machine {machine.name!r} has "
                              f"{machine.devices_per_node} GPUs per node")
        if ranks_per_node * threads[ranks_per_node] > machine.node.cores and not runs_here:
            raise SchemaError("sweep.threads_per_rank", f"{ranks_per_node} ranks x {threads[ranks_per_node]} "
                              f"threads exceeds the {machine.node.cores} cores of a {machine.name!r} node")
    user_walltime = walltime_seconds(spec.job.walltime) if spec.job.walltime else None
    points: list[Point] = []
    for nodes, ranks_per_node in ((n, r) for n in sweep.nodes for r in rpn_values):
        ranks = nodes * ranks_per_node
        if sweep.kind == "weak":
            combos = [(sweep.batch_per_rank * ranks, "sweep.batch_per_rank")]
        elif sweep.kind == "strong":
            combos = [(sweep.global_batch, "sweep.global_batch")]
        else:
            combos = [(b, f"sweep.global_batches[{i}]") for i, b in enumerate(sweep.global_batches or [])]
        for global_batch, where in combos:
            # A point over the node limit is refused whatever its batch; the others must divide evenly.
            if global_batch % ranks and nodes <= machine.limits.max_nodes:
                raise SchemaError(where, f"global batch {global_batch} is not divisible by {ranks} ranks "
                                  f"({nodes} nodes x {ranks_per_node} ranks per node)")
            batch_per_rank = global_batch // ranks
            lr = _scaled_lr(spec, global_batch)
            predicted = None
            refused = None
            if nodes > machine.limits.max_nodes:
                # Refused whatever its walltime: the model does not predict beyond the machine either.
                refused = (f"{nodes} nodes exceed the queue limit of {machine.limits.max_nodes} nodes on "
                           f"{machine.name!r}")
                walltime_s, source = (user_walltime, "user") if user_walltime is not None else (0, "none")
            elif user_walltime is not None:
                walltime_s, source = user_walltime, "user"
            else:
                try:
                    predicted = predict_seconds(spec, machine, nodes, ranks_per_node, global_batch)
                except SchemaError as err:      # this point only: the others may still predict
                    refused = err.reason
                    walltime_s, source = 0, "none"
                else:
                    if predicted is None:
                        raise SchemaError("job.walltime", "required: no walltime prediction is available "
                                          "(analysis.predict.predict_point is missing)")
                    walltime_s = 60 * math.ceil((predicted + spec.job.startup_s) * spec.job.walltime_margin / 60)
                    source = "predicted"
            limit_s, limit_text = machine.max_walltime_for(nodes)
            if refused is None and walltime_s > limit_s:
                refused = (f"walltime {format_walltime(walltime_s)} ({source}) exceeds the queue limit "
                           f"{limit_text} on {machine.name!r}")
            for rep in range(spec.repetitions):
                points.append(Point(
                    point_id=point_id(nodes, ranks, global_batch, rep, spec.repetitions), nodes=nodes,
                    ranks_per_node=ranks_per_node, threads_per_rank=threads[ranks_per_node],
                    global_batch=global_batch, batch_per_rank=batch_per_rank, repetition=rep,
                    seed=spec.training.seed + rep, lr=lr, walltime_s=walltime_s, walltime_source=source,
                    predicted_s=predicted, refused=refused))
    out = Path(output_dir if output_dir is not None else (spec.output or Path("runs") / spec.name)).absolute()
    chosen = python or spec.job.python
    words = [chosen] if isinstance(chosen, str) else list(chosen or []) or [sys.executable]
    return Plan(spec=spec, machine=machine, output_dir=out, points=points, python=words[0],
                python_args=tuple(words[1:]))


def _scaled_lr(spec: SweepSpec, global_batch: int) -> float | None:
    """lr · (B / base_batch)^p with p = 1 (linear), ½ (sqrt), 0 (none)."""
    t = spec.training
    if t.lr is None:
        return None
    power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[t.lr_scaling]
    return t.lr * (global_batch / t.base_batch) ** power


@dataclass(frozen=True)
class JobGroup:
    """Points that run in one scheduler job, one after another (one point unless packing)."""

    job_name: str
    points: list[Point]

    @property
    def nodes(self) -> int:
        return max(p.nodes for p in self.points)

    @property
    def walltime_s(self) -> int:
        return sum(p.walltime_s for p in self.points)


def job_groups(the_plan: Plan, points: list[Point] | None = None) -> list[JobGroup]:
    """Group accepted points into jobs. With ``job.pack``, consecutive points with the same node count share
    one allocation while their summed walltime stays within ``pack_walltime`` (default: the queue limit)."""
    points = the_plan.accepted if points is None else points
    prefix = f"ls-{the_plan.spec.name}"
    if not the_plan.spec.job.pack:
        return [JobGroup(f"{prefix}-{p.point_id}", [p]) for p in points]
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.nodes):
        limit_s = the_plan.machine.max_walltime_for(p.nodes)[0]
        budget = min(walltime_seconds(the_plan.spec.job.pack_walltime) if the_plan.spec.job.pack_walltime
                     else limit_s, limit_s)
        last = groups[-1] if groups else None
        if last and last[0].nodes == p.nodes and sum(q.walltime_s for q in last) + p.walltime_s <= budget:
            last.append(p)
        else:
            groups.append([p])
    return [JobGroup(f"{prefix}-{g[0].point_id}" + (f"-pack{len(g)}" if len(g) > 1 else ""), g) for g in groups]


def describe(the_plan: Plan) -> str:
    """The plan as a table plus the total cost, as `larscale sweep plan` prints it."""
    spec, m = the_plan.spec, the_plan.machine
    lines = [f"sweep {spec.name}: {spec.sweep.kind} scaling of {spec.model} ({spec.framework}) on {m.name} "
             f"[{m.scheduler}/{m.launcher}], {len(the_plan.points)} points -> {the_plan.output_dir}",
             f"{'point':<28} {'nodes':>5} {'ranks':>6} {'thr':>4} {'global_b':>9} {'b/rank':>7} {'lr':>9} "
             f"{'walltime':>10} {'node-h':>9}  note"]
    for p in the_plan.points:
        lr = f"{p.lr:.4g}" if p.lr is not None else "-"
        note = f"REFUSED: {p.refused}" if p.refused else (
            f"predicted {p.predicted_s:.0f} s" if p.predicted_s is not None else p.walltime_source)
        lines.append(f"{p.point_id:<28} {p.nodes:>5} {p.ranks:>6} {p.threads_per_rank:>4} {p.global_batch:>9} "
                     f"{p.batch_per_rank:>7} {lr:>9} {p.walltime:>10} {p.node_hours:>9.2f}  {note}")
    groups = job_groups(the_plan)
    chain = spec.job.chain
    hours = the_plan.node_hours * chain
    lines.append(f"total: {len(the_plan.accepted)} runs in {len(groups)} jobs"
                 + (f" x a chain of {chain}" if chain > 1 else "") + f", {hours:.2f} node-hours requested"
                 + (f" ({hours * m.charge.factor:.2f} {m.charge.unit} at {m.charge.factor:g} per node-hour)"
                    if m.charge else "")
                 + (f"; {len(the_plan.refused)} points refused" if the_plan.refused else ""))
    return "\n".join(lines)


def plan_summary(the_plan: Plan) -> dict[str, Any]:
    """`sweep plan --format json`: the plan with a stable shape (every point, accepted or refused with why)."""
    spec, m = the_plan.spec, the_plan.machine
    charge = m.charge
    job_of = {p.point_id: g.job_name for g in job_groups(the_plan) for p in g.points}
    return {"sweep": spec.name, "kind": spec.sweep.kind, "model": spec.model, "framework": spec.framework,
            "machine": m.name, "scheduler": m.scheduler, "launcher": spec.job.launcher or m.launcher,
            "precision": the_plan.precision, "output_dir": str(the_plan.output_dir),
            "points": [{**p.params(), "walltime": p.walltime, "node_hours": p.node_hours,
                        "gpus_per_node": the_plan.gpus_per_node(p.ranks_per_node), "job_name": job_of.get(p.point_id),
                        "refused": p.refused} for p in the_plan.points],
            "jobs": len(set(job_of.values())), "chain": spec.job.chain,
            "node_hours": the_plan.node_hours * spec.job.chain,
            "charge": ({"factor": charge.factor, "unit": charge.unit,
                        "total": the_plan.node_hours * spec.job.chain * charge.factor} if charge else None),
            "refused": len(the_plan.refused)}


def with_output(the_plan: Plan, output_dir: str | Path) -> Plan:
    return replace(the_plan, output_dir=Path(output_dir).absolute())
