"""`larscale calibrate`: a machine profile fitted to this machine's measurements, and the fit's report text.

The measurements: ``larscale bench-comm`` / ``bench-hvd`` CSVs, fitted by :mod:`analysis.fit_comm` (α, β per
link, γ, δ), and training run directories read by :mod:`analysis.runs`, fitted by :mod:`analysis.fit_compute`
(measured images/s, the compute model's efficiency). This module runs the compute fit the way the command does
(:func:`fit_runs_compute`), writes the base profile with ``network`` and ``compute`` replaced
(:func:`calibrated_profile`) and formats what was fitted (:func:`format_report`).

Not fitted: the overlap fractions (``network.intra_node.overlap_fraction``, ``inter_node.overlap_fraction``,
``network.reduce_overlap_fraction``: which share of each cost term can hide behind the backward pass).
1-rank runs communicate nothing and bench-comm computes nothing, so these inputs cannot identify them; they
are properties of the machine (are there cores, DMA engines or NICs left to communicate while the cores
compute?) and are carried over from the base profile, as the ``calibration.from_base_profile`` block records.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from typing import Any

from analysis.fit_comm import CommFit
from analysis.fit_compute import ComputeFit, fit_compute, roofline_point_of
from analysis.fitting import CalibrationError, plain
from analysis.runs import RunMeasurement, pace_side_by_side, partial_node_speedup, runs_alone


def fit_runs_compute(base, runs: Sequence[RunMeasurement], runs_apart: bool = False) -> ComputeFit:
    """The compute fit of ``runs`` against ``base`` (a MachineProfile), as `larscale calibrate` does it.

    Unless ``runs_apart``, runs of one workload that ran side by side are combined, the slowest per step
    (:func:`analysis.runs.pace_side_by_side`); when runs alone measured the same workloads, the loaded node's
    rates are fitted and the ratio becomes ``partial_node_speedup``. A CPU profile's devices are its cores
    grouped per device; the roofline model is fitted when the base profile uses it.
    """
    alone = runs_alone(runs)
    paced: list[str] = []
    speedup = None
    if not runs_apart:
        runs, paced = pace_side_by_side(runs)
        loaded = [r for r in runs if r.side_by_side > 1]
        speedup, speedup_notes = partial_node_speedup(loaded, alone)
        if speedup is not None:
            # The rates to fit are the loaded node's; the runs alone gave the speed-up.
            runs, paced = loaded, paced + speedup_notes
    devices = base.node.devices
    cores_per_device = base.node.cores / devices.count if devices.kind == "cpu" else 1.0
    roofline = roofline_point_of(base, cores_per_device) if base.compute.model == "roofline" else None
    half = base.compute.half_efficiency_batch
    compute = fit_compute(runs, devices.peak_tflops["fp32"] * 1e12, cores_per_device=cores_per_device,
                          default_half_efficiency_batch=4.0 if half is None else half, notes=paced,
                          roofline=roofline, default_roofline_half_batch=half or 0.0)
    if speedup is not None:
        compute = dataclasses.replace(compute, partial_node_speedup=speedup)
    precisions = sorted({r.precision for r in runs if r.precision is not None})
    if len(precisions) > 1:
        raise CalibrationError(f"the runs were trained at {' and '.join(precisions)}: the measured rates of one "
                               "profile hold for one precision; calibrate each precision's runs on their own")
    return dataclasses.replace(compute, precision=precisions[0]) if precisions else compute


def calibrated_profile(base, comm: CommFit | None = None, compute: ComputeFit | None = None,
                       name: str | None = None, inputs: dict[str, Any] | None = None,
                       overlap: tuple[str, str] | None = None, jitter: tuple[float, int, str] | None = None
                       ) -> dict[str, Any]:
    """The base profile (a MachineProfile) with ``network`` and ``compute`` replaced by the fits.

    Returns a plain mapping in the profile schema (validated by :func:`larscale.machine.parse_machine`);
    ``calibration`` holds the fit, its residuals and its inputs.
    """
    from larscale.machine import parse_machine

    data = copy.deepcopy(base.to_dict())
    data["name"] = name or f"{base.name}-calibrated"
    data["description"] = f"{base.description} (calibrated {_dt.date.today().isoformat()})".strip()
    block: dict[str, Any] = {"base_profile": base.name,
                             "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                             "inputs": inputs or {}}
    if comm is not None:
        network = data["network"]
        for key, link in (("intra_node", comm.intra), ("inter_node", comm.inter)):
            if link.alpha_s is None:
                continue
            if link.bandwidth_gbps is None:
                raise CalibrationError(f"{key}: the fit left no per-byte cost on the link (beta = 0); fix gamma "
                                       "or check the rows")
            network[key] = {**network[key], "latency_us": link.latency_us, "bandwidth_gbps": link.bandwidth_gbps}
        network["reduce_gbytes_per_s"] = comm.reduce_gbytes_per_s
        if comm.copy_s_per_byte is not None:       # measured: replaces the base profile's (0: no copy cost)
            network.pop("fusion_copy_gbytes_per_s", None)
            if comm.copy_s_per_byte > 0:
                network["fusion_copy_gbytes_per_s"] = 1.0 / (comm.copy_s_per_byte * 1e9)
        network["algorithm"] = comm.algorithm
        block["network"] = comm.summary()
        block["network_residuals"] = plain(comm.residuals)
    if compute is not None:
        section = data.setdefault("compute", {})
        section["sustained_fraction"] = compute.sustained_fraction
        if compute.efficiency_scale is not None:
            # The roofline model stays the model: its scale and small-batch point fitted to the runs.
            section["model"] = "roofline"
            section["efficiency_scale"] = compute.efficiency_scale
            section["half_efficiency_batch"] = compute.roofline_half_batch
        else:
            section["model"] = "sustained"
            section["half_efficiency_batch"] = compute.half_efficiency_batch
        section.pop("half_efficiency_gflop", None)          # h is fitted in images; a work-based h would win
        section["step_overhead_s"] = 0.0                    # measured throughput includes the optimizer step
        if compute.partial_node_speedup is not None:
            section["partial_node_speedup"] = compute.partial_node_speedup
        merged = {k: dict(v) for k, v in (section.get("measured_images_per_s") or {}).items()}
        for key, table in compute.measured_images_per_s.items():
            merged.setdefault(key, {}).update(table)
        section["measured_images_per_s"] = merged
        if compute.precision is not None:
            section["measured_precision"] = compute.precision
        block["compute"] = compute.summary()
    if jitter is not None:
        # (cv of one rank's busy time from the step logs, side-by-side runs the measured rates already include,
        # how it was measured): analysis/jitter.py.
        collectives = data["network"].setdefault("collectives", {})
        collectives["step_jitter_cv"], collectives["jitter_included_ranks"] = jitter[0], jitter[1]
        block["jitter"] = {"step_jitter_cv": jitter[0], "jitter_included_ranks": jitter[1], "source": jitter[2]}
    if overlap is not None:
        data["network"]["overlap"] = overlap[0]
        block["overlap"] = {"network.overlap": overlap[0], "source": overlap[1]}
    # Not identifiable from the inputs: 1-rank runs have no communication and bench-comm has no compute, so
    # how much of the allreduce hides behind the backward pass is the base profile's physical statement.
    block["from_base_profile"] = overlap_fractions(base)
    data["calibration"] = plain(block)
    data["sources"] = [*data.get("sources", []), "larscale calibrate (see calibration)"]
    parse_machine(plain(data), source=data["name"])        # the result must load as a profile
    return plain(data)


def profile_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=120)


def format_report(comm: CommFit | None, compute: ComputeFit | None) -> str:
    """Human-readable summary of the fits (what `larscale calibrate` prints)."""
    lines = []
    if comm is not None:
        lines.append(f"communication ({comm.algorithm} formula; gamma {comm.gamma_source}):")
        for name, link in (("intra-node", comm.intra), ("inter-node", comm.inter)):
            if link.alpha_s is not None:
                bandwidth = link.bandwidth_gbps
                lines.append(f"  {name}: alpha {link.latency_us:.2f} us, beta {link.beta_s_per_byte * 1e9:.4g} ns/B"
                             f" ({bandwidth:.3g} Gb/s)" if bandwidth else f"  {name}: alpha {link.latency_us:.2f} us")
        lines.append(f"  gamma {comm.gamma_s_per_byte * 1e9:.4g} ns/B ({comm.reduce_gbytes_per_s:.3g} GB/s reduced)")
        if comm.copy_s_per_byte is not None:
            rate = f"{1 / (comm.copy_s_per_byte * 1e9):.3g} GB/s" if comm.copy_s_per_byte else "none measured"
            lines.append(f"  fusion-buffer copy {comm.copy_s_per_byte * 1e9:.4g} ns/B ({rate})")
        for op in comm.operations:
            lines.append(f"  {op}: rms relative residual {comm.rms_relative(op):.1%}, "
                         f"max {comm.max_relative(op):.1%}")
        for name, link in comm.pingpong.items():
            lines.append(f"  ping-pong ({name}-node, diagnostic): alpha {link.latency_us:.2f} us, "
                         f"{link.bandwidth_gbps or math.inf:.3g} Gb/s")
        lines.extend(f"  note: {note}" for note in comm.notes)
    if compute is not None:
        if compute.efficiency_scale is not None:
            lines.append(f"compute: roofline efficiency scale {compute.efficiency_scale:.3f}, half-efficiency batch "
                         f"{compute.roofline_half_batch:.2f} per device (rms residual {compute.rms_relative():.1%})")
        else:
            lines.append(f"compute: sustained fraction {compute.sustained_fraction:.3f}, half-efficiency batch "
                         f"{compute.half_efficiency_batch:.2f} (FLOP model rms residual {compute.rms_relative():.1%})")
        lines.append(f"  {'run key':<16}{'batch':>6}{'steps':>6}{'busy s':>10}{'images/s':>10}{'model':>11}")
        for r in compute.runs:
            lines.append(f"  {r['key']:<16}{r['batch_per_rank']:>6}{r['steps_measured']:>6}{r['busy_s']:>10.4f}"
                         f"{r['images_per_s']:>10.2f}{r['relative']:>+11.1%}")
        if compute.partial_node_speedup is not None:
            lines.append(f"  partial-node speed-up {compute.partial_node_speedup:.3f} (a device alone vs beside "
                         "busy neighbours)")
        lines.extend(f"  note: {note}" for note in compute.notes)
    return "\n".join(lines)


def overlap_mode(runs: Sequence[RunMeasurement], base, given: str | None = None) -> tuple[str, str]:
    """``(network.overlap, why)`` for the calibrated profile: ``given`` (--overlap), else what the runs
    recorded (backend.allreduce_overlap: a compiled backward that hands every gradient over at its end
    records "none"), else the base profile's. Runs that disagree are an error: one profile, one mode."""
    if given is not None:
        return given, "given with --overlap"
    seen = sorted({r.allreduce_overlap for r in runs if r.allreduce_overlap})
    if len(seen) > 1:
        raise CalibrationError(f"the runs recorded different allreduce overlaps ({', '.join(seen)}): calibrate "
                               "compiled and eager runs into separate profiles, or give --overlap")
    if seen:
        return seen[0], f"recorded by the runs (backend.allreduce_overlap: {seen[0]})"
    return base.network.overlap, f"the base profile's ({base.name}); the runs did not record it"


def overlap_fractions(profile) -> dict[str, float]:
    """The profile's overlap fractions by field path: what calibration keeps from the base profile."""
    net = profile.network
    return {"network.intra_node.overlap_fraction": net.intra_node.overlap_fraction,
            "network.inter_node.overlap_fraction": net.inter_node.overlap_fraction,
            "network.reduce_overlap_fraction": net.reduce_overlap_fraction}


def format_base_properties(base) -> str:
    """What the calibrated profile takes from the base profile unfitted (printed after the report)."""
    kept = ", ".join(f"{k.removeprefix('network.')} {v:g}" for k, v in overlap_fractions(base).items())
    return (f"kept from {base.name} (the inputs cannot identify them; shares of communication that can hide "
            f"behind the backward pass): {kept}")
