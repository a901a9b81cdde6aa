"""A scaling study from measured sweeps: the per-point table, the profile calibrated on the smaller points and
checked out of sample on the larger ones, the projection to a larger scale, and the allocation request.

Pure functions of the sweeps (:mod:`analysis.sweepdirs`) and a base profile; :mod:`analysis.study_report`
writes them as a page. The steps:

1. **Points** (:func:`points_table`): per measured point its step time (the mean over measured steps of the
   slowest rank's step: a synchronous step waits for it, and a time-to-train is the sum of the steps), images/s
   = global batch / that, the medians of the step's parts (compute, exposed communication: the time the step
   was blocked on the allreduce, data, optimizer), and the speed-up over the sweep's smallest point with its
   ideal (the ratio of ranks) and their ratio, the efficiency. For a strong sweep (fixed global batch) the
   speed-up is the step-time ratio; for a weak one (fixed batch per rank) the throughput ratio, whose ideal is
   also the ratio of ranks: images/s ratio serves both.
2. **Calibration** (:func:`calibrate_on_smaller`): `larscale calibrate`'s fits on the points with the fewest
   ranks (the lower half of the rank counts, or ``fit_max_ranks``) and any bench-comm/bench-hvd CSVs; every
   point is then predicted, so the larger ones are out-of-sample checks of the model.
3. **Projection** (:func:`project`): the calibrated model at ``to_nodes``, with ``predict``'s 90 % interval
   (:func:`study_params`: the calibration's own residuals, the compute fit's and the sweep's multi-rank points',
   where they are wider than the device kind's spread), widened by what the inputs could not identify (a link
   no CSV measured is predicted with half and twice its bandwidth and latency, each with its interval; the
   overlap fractions are the base profile's).
4. **Allocation** (:func:`allocation`): `larscale plan` on the calibrated profile for the target (epochs or
   top-1), the Pareto-optimal configurations with time to train, node-hours, device-hours, charge and the
   walltime chain, each beside its values at the same interval's ends (plan's own ends of ``predict``'s
   interval, over the link variants).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from analysis.sweepdirs import ReportError, Sweep, SweepPoint


@dataclass(frozen=True)
class StudyOptions:
    """What `larscale report` was asked beyond the sweeps."""

    bench: tuple[str, ...] = ()             # bench-comm / bench-hvd CSVs fitted with the runs
    fit_max_ranks: int | None = None        # fit on points of at most this many ranks (default: lower half)
    to_nodes: int | None = None             # projection scale (default: the profile's max_nodes)
    ranks_per_node: int | None = None       # at the projection (default: the sweeps' largest)
    epochs: float | None = None             # allocation target: epochs ...
    top1: float | None = None               # ... or a top-1 from the seed tables
    restart_overhead_s: float = 120.0       # per job of a walltime chain
    configurations: int = 5                 # allocation rows to list


def measured_points(sweeps: Sequence[Sweep]) -> list[SweepPoint]:
    return [p for s in sweeps for p in s.points if p.measured]


def points_table(sweeps: Sequence[Sweep]):
    """One row per measured point (see the module docstring, step 1)."""
    import pandas as pd

    rows = []
    for sweep in sweeps:
        mine = [p for p in sweep.points if p.measured]
        if not mine:
            continue
        smallest = min(p.ranks for p in mine)
        base = [p.run.ranks * p.run.batch_per_rank / p.run.step_s_mean for p in mine if p.ranks == smallest]
        base_rate = sum(base) / len(base)
        for p in sorted(mine, key=lambda p: (p.ranks, p.global_batch, p.point_id)):
            run = p.run
            global_batch = run.ranks * run.batch_per_rank
            rate = global_batch / run.step_s_mean
            speedup, ideal = rate / base_rate, p.ranks / smallest
            rows.append({"sweep": sweep.name, "kind": sweep.kind, "point": p.point_id, "nodes": p.nodes,
                         "ranks_per_node": p.ranks_per_node, "ranks": run.ranks, "global_batch": global_batch,
                         "batch_per_rank": run.batch_per_rank, "steps_measured": run.steps_measured,
                         "step_s": run.step_s_mean, "step_s_median": run.step_s, "images_per_s": rate,
                         "compute_s": run.compute_s, "exposed_comm_s": run.allreduce_s, "data_s": run.data_s,
                         "optimizer_s": run.optimizer_s, "speedup": speedup, "ideal_speedup": ideal,
                         "efficiency": speedup / ideal})
    return pd.DataFrame(rows)


def problems_table(sweeps: Sequence[Sweep]):
    """Every point without a measurement, with its state and the reason."""
    import pandas as pd

    rows = [{"sweep": s.name, "point": p.point_id, "nodes": p.nodes, "ranks": p.ranks,
             "global_batch": p.global_batch, "state": p.state, "reason": p.reason, "run_dir": p.run_dir}
            for s in sweeps for p in s.points if not p.measured]
    return pd.DataFrame(rows, columns=["sweep", "point", "nodes", "ranks", "global_batch", "state", "reason",
                                       "run_dir"])


@dataclass
class Calibration:
    """The profile fitted on the smaller points and every point predicted by it."""

    profile: Any                             # MachineProfile
    data: dict[str, Any]                     # the same as a plain mapping (written as profile.yaml)
    fit_max_ranks: int
    comparison: Any                          # DataFrame: every measured point, predicted vs measured
    report: str                              # `larscale calibrate`'s text for the fit
    unidentified: list[str] = field(default_factory=list)
    unidentified_links: list[str] = field(default_factory=list)   # "intra_node" / "inter_node"

    @property
    def out_of_sample(self):
        return self.comparison[self.comparison["role"] == "out of sample"]

    def band(self) -> tuple[float, float]:
        """The most negative and most positive relative error (predicted / measured − 1, 0 bounding each) over
        every point, fitted and out of sample (reported beside the interval, which it does not set)."""
        errors = self.comparison["error"]
        return min(float(errors.min()), 0.0), max(float(errors.max()), 0.0)

    def scale_residual(self) -> float:
        """RMS log error of the points with more than one rank, fitted and out of sample (0 without any): the
        calibration's residual of what scale adds."""
        errors = self.comparison.loc[self.comparison["ranks"] > 1, "error"]
        return math.sqrt(sum(math.log1p(float(e)) ** 2 for e in errors) / len(errors)) if len(errors) else 0.0


def study_params(calibration: Calibration, machine):
    """``machine``'s parameters (PerfParams) with the interval's spread of what scale adds no tighter than the
    sweep's own multi-rank residual (:meth:`Calibration.scale_residual`), as a calibrated profile's compute
    spread is no tighter than its fit's residual: ``predict``'s interval then carries the calibration's errors."""
    from analysis.params import PerfParams

    params = PerfParams.from_machine(machine)
    return params.replace(scale_sigma=max(params.scale_sigma, calibration.scale_residual()))


def default_fit_max_ranks(points: Sequence[SweepPoint]) -> int:
    counts = sorted({p.ranks for p in points})
    return counts[max(1, len(counts) // 2) - 1]


def calibrate_on_smaller(base, sweeps: Sequence[Sweep], options: StudyOptions) -> Calibration:
    """Step 2 of the module docstring. ReportError when the fit cannot be made."""
    from analysis.calibrate import calibrated_profile, fit_runs_compute, format_report, overlap_mode
    from analysis.fit_comm import CommFitOptions, fit_comm
    from analysis.fitting import CalibrationError
    from analysis.validate import compare_run
    from larscale.benchformat import read_csv
    from larscale.machine import parse_machine

    points = measured_points(sweeps)
    fit_max = options.fit_max_ranks or default_fit_max_ranks(points)
    fitted = [p for p in points if p.ranks <= fit_max]
    if not fitted:
        raise ReportError(f"--fit-max-ranks {fit_max}: no measured point has that few ranks "
                          f"(the smallest has {min(p.ranks for p in points)})")
    try:
        comm = None
        if options.bench:
            rows = [row for path in options.bench for row in read_csv(path)]
            comm = fit_comm(rows, CommFitOptions.for_profile(base))
        runs = [p.run for p in fitted]
        compute = fit_runs_compute(base, runs)
        data = calibrated_profile(base, comm, compute, name=f"{base.name}-from-sweeps",
                                  inputs={"bench": list(options.bench), "runs": [p.run_dir for p in fitted],
                                          "sweeps": [str(s.path) for s in sweeps]},
                                  overlap=overlap_mode(runs, base))
        profile = parse_machine(data, source=data["name"])
    except (CalibrationError, ValueError) as err:
        raise ReportError(f"calibration from the sweeps failed: {err}") from None
    import pandas as pd

    rows = []
    for p in points:
        row = compare_run(p.run_dir, profile)
        rows.append({"sweep": p.sweep, "point": p.point_id, "role": "fitted" if p.ranks <= fit_max else "out of sample",
                     **{k: row[k] for k in ("nodes", "ranks", "global_batch", "predicted_s", "predicted_compute_s",
                                             "predicted_comm_exposed_s", "measured_s", "error")}})
    links = [] if comm is None else [k for k, link in (("intra_node", comm.intra), ("inter_node", comm.inter))
                                     if link.alpha_s is not None]
    unidentified_links = [k for k in ("intra_node", "inter_node") if k not in links]
    unidentified = []
    for link in unidentified_links:
        unidentified.append(f"network.{link} latency and bandwidth: no bench-comm/bench-hvd row measured this link "
                            f"(kept from {base.name}; the interval spans half and twice them)")
    if not any(p.nodes > 1 for p in points):
        unidentified.append("anything across nodes: every point ran on one node")
    unidentified.append("the overlap fractions (how much communication hides behind the backward pass): kept "
                        f"from {base.name}")
    if not any(p.ranks > fit_max for p in points):
        unidentified.append("no point was left out of the fit: the model's error at larger scale is unchecked")
    return Calibration(profile=profile, data=data, fit_max_ranks=fit_max, comparison=pd.DataFrame(rows),
                       report=format_report(comm, compute), unidentified=unidentified,
                       unidentified_links=unidentified_links)


def profile_variants(calibration: Calibration) -> dict[str, Any]:
    """The calibrated profile with every unidentified link slower (half the bandwidth, twice the latency) and
    faster (the reverse): the ends of what the inputs leave open."""
    from larscale.machine import parse_machine

    out = {"central": calibration.profile}
    if not calibration.unidentified_links:
        return out
    for name, factor in (("slow", 2.0), ("fast", 0.5)):
        data = copy.deepcopy(calibration.data)
        for link in calibration.unidentified_links:
            section = data["network"].get(link) or {}
            if "bandwidth_gbps" in section:
                section["bandwidth_gbps"] = section["bandwidth_gbps"] / factor
            if "latency_us" in section:
                section["latency_us"] = section["latency_us"] * factor
        data["name"] = f"{data['name']}-{name}"
        out[name] = parse_machine(data, source=data["name"])
    return out


@dataclass
class Projection:
    nodes: int
    ranks_per_node: int
    table: Any                               # DataFrame: one row per configuration projected
    band: tuple[float, float]                # the sweep's errors, most negative and most positive (information)
    scale_sigma: float                       # the interval's spread of what scale adds (study_params)
    notes: list[str]


def _projection_batches(sweeps: Sequence[Sweep], ranks: int) -> list[tuple[str, int]]:
    """(what, global batch) at ``ranks``: a strong sweep's global batch (when it divides), a weak sweep's batch
    per rank times the ranks."""
    out = []
    for sweep in sweeps:
        measured = [p for p in sweep.points if p.measured]
        if not measured:
            continue
        if sweep.kind == "strong":
            batch = max(p.global_batch for p in measured)
            if batch % ranks == 0:
                out.append((f"{sweep.name}: strong, global batch {batch}", batch))
        else:
            per_rank = max(p.batch_per_rank for p in measured)
            out.append((f"{sweep.name}: weak, {per_rank} per rank", per_rank * ranks))
    seen, unique = set(), []
    for what, batch in out:
        if batch not in seen:
            seen.add(batch)
            unique.append((what, batch))
    return unique


def project(calibration: Calibration, sweeps: Sequence[Sweep], options: StudyOptions) -> Projection:
    """Step 3 of the module docstring."""
    import pandas as pd

    from analysis.predict import predict

    profile = calibration.profile
    nodes = options.to_nodes or profile.limits.max_nodes
    if nodes < 1 or nodes > profile.limits.max_nodes:
        base = calibration.data["calibration"]["base_profile"]
        raise ReportError(f"--to-nodes {nodes}: machine {base!r} has 1..{profile.limits.max_nodes} nodes "
                          "(limits.max_nodes)")
    points = measured_points(sweeps)
    rpn = options.ranks_per_node or max(p.ranks_per_node for p in points)
    model = points[0].run.model
    image_size = points[0].run.image_size
    low, high = calibration.band()
    variants = profile_variants(calibration)
    params = {name: study_params(calibration, machine) for name, machine in variants.items()}
    rows = []
    for what, batch in _projection_batches(sweeps, nodes * rpn):
        # predict's interval at each link variant: the ends are the fastest variant's low and the slowest's high.
        ends = {name: predict(model, machine, nodes=nodes, global_batch=batch, ranks_per_node=rpn, epochs=1,
                              image_size=image_size, params=params[name]).record(0)
                for name, machine in variants.items()}
        central = ends["central"]["iteration_s"]
        lo = min(e["iteration_s_low"] for e in ends.values())
        hi = max(e["iteration_s_high"] for e in ends.values())
        rows.append({"configuration": what, "nodes": nodes, "ranks": nodes * rpn, "global_batch": batch,
                     "iteration_s": central, "iteration_s_low": lo, "iteration_s_high": hi,
                     "images_per_s": batch / central, "images_per_s_low": batch / hi,
                     "images_per_s_high": batch / lo})
    central_params = params["central"]
    notes = [f"interval: predict's 90 % interval on the calibrated profile (spread of the compute "
             f"{central_params.compute_sigma_measured:.3f} measured / {central_params.compute_sigma_roofline:.3f} "
             f"modelled, of what scale adds {central_params.scale_sigma:.3f}: the larger of the device kind's and "
             f"the sweep's multi-rank RMS log error {calibration.scale_residual():.3f})"
             + (", its ends from the unidentified links at twice and half their bandwidth and latency"
                if calibration.unidentified_links else "")
             + f"; the sweep's errors: {low:+.1%} to {high:+.1%} (predicted / measured − 1, out of sample included)"]
    if not rows:
        notes.append(f"no sweep's batch divides over {nodes * rpn} ranks: nothing projected")
    return Projection(nodes=nodes, ranks_per_node=rpn, table=pd.DataFrame(rows), band=(low, high),
                      scale_sigma=central_params.scale_sigma, notes=notes)


def allocation(calibration: Calibration, projection: Projection, model: str, options: StudyOptions):
    """Step 4 of the module docstring: (table, notes). The table lists the Pareto-optimal configurations of
    `larscale plan` on the calibrated profile, fastest first, each figure beside its interval's ends."""
    import pandas as pd

    from analysis.plan import chain_jobs, plan

    epochs = options.epochs if options.top1 is None else None
    notes = []
    if epochs is None and options.top1 is None:
        epochs = 90.0
        notes.append("no --epochs or --top1 given: 90 epochs")
    plans = {}
    try:
        for name, machine in profile_variants(calibration).items():
            plans[name] = plan(model, machine, target_top1=options.top1, epochs=epochs, max_nodes=projection.nodes,
                               ranks_per_node=projection.ranks_per_node,
                               restart_overhead_s=options.restart_overhead_s,
                               params=study_params(calibration, machine))
    except ValueError as err:
        # A real answer for the user (e.g. nothing fits the machine's memory): said, not a failure of the report.
        return pd.DataFrame(), [*notes, f"no allocation to request on {calibration.profile.name}: {err}"]
    central = plans["central"]
    profile = calibration.profile
    devices = profile.node.devices.count
    factor = profile.charge.factor if profile.charge is not None else None
    unit = profile.charge.unit if profile.charge is not None else "node-hours"

    def chain(nodes: int, train_s: float) -> int:
        """Jobs of a walltime chain under the queue's limit for this job size (as plan counts them)."""
        return int(chain_jobs(train_s, profile.max_walltime_for(nodes)[0], options.restart_overhead_s))

    rows = []
    for row in central.front[: options.configurations]:
        # plan's own ends of predict's interval, over the link variants: the fastest's low, the slowest's high.
        same = [r for p in plans.values() for r in p.rows if (r.nodes, r.global_batch) == (row.nodes, row.global_batch)]
        fast = min(same, key=lambda r: r.time_to_train_s_low)
        slow = max(same, key=lambda r: r.time_to_train_s_high)
        node_hours = {"": row.node_hours, "_low": fast.node_hours_low, "_high": slow.node_hours_high}
        record = {"nodes": row.nodes, "ranks_per_node": row.ranks_per_node, "global_batch": row.global_batch,
                  "epochs": row.epochs, "time_to_train_h": row.time_to_train_s / 3600,
                  "time_to_train_h_low": fast.time_to_train_s_low / 3600,
                  "time_to_train_h_high": slow.time_to_train_s_high / 3600,
                  "walltime_limit_h": profile.max_walltime_for(row.nodes)[0] / 3600,
                  "jobs": row.jobs, "jobs_low": chain(row.nodes, fast.time_to_train_s_low),
                  "jobs_high": chain(row.nodes, slow.time_to_train_s_high),
                  **{f"node_hours{end}": value for end, value in node_hours.items()},
                  **{f"device_hours{end}": value * devices for end, value in node_hours.items()}}
        if factor is not None:
            record.update({f"charge_{unit}{end}": value * factor for end, value in node_hours.items()})
        rows.append(record)
    notes += [f"{central.model} on ImageNet-1k at its native input size, {epochs:g} epochs" if epochs else
              f"{central.model} to top-1 {options.top1:g} % (seed tables' epochs)",
              f"a walltime chain of jobs under the queue's limit per job size, each resuming the last checkpoint "
              f"and paying {options.restart_overhead_s:g} s to restart",
              "_low / _high: the ends of the same 90 % interval as the projection's (plan on the calibrated "
              "profile: predict's interval, each end with its own walltime chain)",
              "device-hours = node-hours x the node's devices"
              + (f"; charge = node-hours x {factor:g} ({unit})" if factor is not None else
                 "; the profile states no charge factor (charge: {factor: ...})")]
    notes += central.notes
    return pd.DataFrame(rows), notes
