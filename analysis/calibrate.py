"""`larscale calibrate`: fit the model's α, β, γ and compute efficiency to this machine's measurements.

Communication (from ``larscale bench-comm`` CSVs). Each allreduce row (n bytes, p = nodes·q ranks) is a
linear equation in the parameters (:func:`analysis.comm.allreduce_terms`, the same code that predicts):

    t = a_i·α_i + a_e·α_e + b_i·β_i + b_e·β_e + c·γ

Rows on one node inform the intra-node link (α_i, β_i), rows across nodes the inter-node one. The fit is
non-negative least squares on *relative* errors (each row divided by its measured median): times span five
orders of magnitude from 4 B to 64 MiB, and plain least squares would ignore every small message, i.e. α.

**β and γ are not separable from allreduce times.** For the ring, the bandwidth terms are
``2(p−1)/p·n·β + (p−1)/p·n·γ = (p−1)/p·n·(2β + γ)`` — proportional for *every* p, so adding more rank counts
does not help; Rabenseifner, the binomial tree and recursive doubling likewise see only ``2β + γ`` or
``β + γ``. What the allreduce rows determine is α and an effective per-byte cost ``2β + γ``. The γ column is
pinned by an independent measurement: bench-comm's ``reduce_local`` rows (every rank timing
``numpy.add(a, b, out=a)`` on n bytes at once: ``c + n·γ``, fitted jointly with their own intercept c, the
numpy call overhead). Without such rows γ is fixed at the given value (the base profile's
``network.reduce_gbytes_per_s``, documented default 10 GB/s) and the report says so. Then β comes out of the
effective cost, so the fitted (α, β, γ) reproduce the measured allreduce whatever the split.

**Which allreduce.** ``larscale bench-hvd`` (scaling.hvdcomm) writes ``horovod_allreduce`` rows: the same
harness timing ``hvd.allreduce_`` (op=Average), the path a training step's gradients take (enqueue, the background
thread's cycle, negotiation, the collective, the scaling). When a CSV has them they are fitted instead of the MPI
``allreduce`` rows (:func:`default_operations`), by their mean (:func:`row_time`) less the expected cycle wait
(:func:`horovod_cycle_wait_s`); the MPI rows are then reported, not fitted.

**Horovod's cycle.** Horovod's background thread starts a cycle at most every ``HOROVOD_CYCLE_TIME``. A call
shorter than a cycle is paced by it: over shared memory here every size from 4 B to 1 MiB took 1.06-1.07 ms
with a 1 ms cycle, though 1 MiB moves for ~0.3 ms; just above a cycle a call may wait for the next one (4 MiB:
2.1-3.6 ms in different runs for ~1.5 ms of transfer). Fitted, those rows put ~0.3 ms of cycle into α, charged
to every bucket of a training step (54 buckets a ResNet-50 step: 32 ms, where Horovod pays the cycle once per
launch, modelled in analysis/overlap.py). So Horovod rows under :data:`PACED_CYCLES` cycles are reported, not
fitted. α is then fitted from the longer rows, weakly (over shared memory 0 to 0.76 ms in different runs),
and bounded by the link's ping-pong latency (the one-way time of its smallest ping-pong message,
:func:`pingpong_latency`; bench-hvd measures it by default): a collective's per-message latency cannot
exceed a message's one-way time. Without ping-pong rows the report says α is weakly determined.

**Fusion copies.** bench-hvd's ``horovod_allreduce_fused`` rows time the same bytes as a group of 16 tensors,
which Horovod copies into its fusion buffer and back out: they are the allreduce's equation plus ``2n·δ``, and
fitted jointly with the lone-tensor rows they give δ (``network.fusion_copy_gbytes_per_s``; the model charges it
to every bucket but a lone tensor larger than the buffer, analysis/overlap.py). Without such rows the base
profile's δ is kept.

``pingpong`` rows (one-way time ``α + n·β`` of one link) are fitted separately and reported as a diagnostic,
not used in the joint fit by default: the library's allreduce need not run at the point-to-point link rate
(over Open MPI's TCP BTL with its default RDMA put protocol, a 2-rank allreduce moved data at about half the
ping-pong rate, see tests/netns.py), and the model must reproduce the allreduce, the operation it predicts.

Compute (from training run directories, ``scaling/`` schema: ``summary.json`` + ``steps/rank-*.jsonl``).
Per run, over the measured steps (warm-up excluded as the summary says), the median of the per-step
slowest-rank non-communication time ``step_s − allreduce_s``. That gives ``measured_images_per_s[model][b]
= b / t`` (the measured model of :mod:`analysis.compute`; repeated runs of one point: the mean of their t),
and, over all runs at once, the FLOP model ``t = F·(b + h)/(d·P·s)`` (F FLOPs per image at the run's image
size, d devices the rank drives, P peak):
``t·d·P/F = b/s + h/s`` is a line in b, so a least-squares line gives the sustained fraction s and the
half-efficiency batch h shared by all models.

Runs of one workload that ran side by side on the same host (one 1-rank run per device, so that each is
measured with its neighbours busy) are combined step by step, the slowest per step, before the fit: a
synchronous step waits for its slowest rank (:func:`pace_side_by_side`; ``--runs-apart`` keeps them apart).

Measured throughput at a non-native image size (a 64-pixel ResNet-50 run) is stored under the key
``"<model>@<size>"`` so that a prediction at the native size never reads it (:func:`workload_key`,
:func:`analysis.compute.measured_key`; a prediction with ``image_size`` reads its own size's entry).

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
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.comm import allreduce_terms, check_algorithm
from larscale.benchformat import ALLREDUCE_OPERATIONS, CSV_OPERATIONS, HOROVOD_OPERATIONS

# Columns of the joint design matrix: the five α-β-γ parameters, the numpy-call overhead of reduce_local and δ,
# the fusion-buffer copy (horovod_allreduce_fused rows only).
PARAMETERS = ("alpha_intra_s", "alpha_inter_s", "beta_intra_s_per_byte", "beta_inter_s_per_byte",
              "gamma_s_per_byte", "reduce_local_overhead_s", "copy_s_per_byte")
OVERHEAD_COLUMN = PARAMETERS.index("reduce_local_overhead_s")
COPY_COLUMN = PARAMETERS.index("copy_s_per_byte")
LINK_COLUMNS = {"intra": (0, 2), "inter": (1, 3)}
DEFAULT_GAMMA_S_PER_BYTE = 1.0 / 10e9     # larscale.machine.Network.reduce_gbytes_per_s default (10 GB/s)


def default_operations(rows: Iterable[dict[str, Any]]) -> tuple[str, ...]:
    """What to fit when the caller does not say: Horovod's allreduce when measured (the path training takes),
    else MPI's; with the reduce_local rows that pin γ."""
    present = {r["operation"] for r in rows}
    if "horovod_allreduce" not in present:
        return ("allreduce", "reduce_local")
    fused = ("horovod_allreduce_fused",) if "horovod_allreduce_fused" in present else ()
    return ("horovod_allreduce", *fused, "reduce_local")


# Horovod rows shorter than this many cycles are shaped by the background thread's cycle (see fit_comm).
PACED_CYCLES = 4


def horovod_cycle_wait_s(cycle_time_ms: float) -> float:
    """Expected wait for Horovod's next cycle included in one back-to-back ``horovod_allreduce`` call.

    The background thread runs a cycle (negotiation, then the ready collectives), then sleeps for the rest of
    ``HOROVOD_CYCLE_TIME``; a call issued when the previous one completed finds the thread at a random point
    of that: half a cycle on average. The fit subtracts it so that α is the collective's own latency: the
    prediction's schedule (analysis.overlap) adds its own cycle waits.
    """
    return 0.5 * cycle_time_ms / 1e3


class CalibrationError(ValueError):
    """The inputs cannot determine what was asked (too few sizes, no rows, a degenerate fit)."""


# ------------------------------------------------------------------------------------------- communication


def row_link(row: dict[str, Any]) -> str:
    return "inter" if int(row["nodes"]) > 1 else "intra"


def design_row(row: dict[str, Any], algorithm: str) -> np.ndarray:
    """Coefficients of :data:`PARAMETERS` in one bench-comm row's time."""
    n = float(row["bytes"])
    out = np.zeros(len(PARAMETERS))
    if row["operation"] in ALLREDUCE_OPERATIONS:
        terms = allreduce_terms(algorithm, n, int(row["nodes"]), int(row.get("ranks_per_node") or 1))
        out[:5] = terms.matrix().reshape(-1)
        if row["operation"] == "horovod_allreduce_fused":
            out[COPY_COLUMN] = 2.0 * n         # into the fusion buffer and back out
    elif row["operation"] == "pingpong":
        alpha, beta = LINK_COLUMNS[row_link(row)]
        out[alpha], out[beta] = 1.0, n
    elif row["operation"] == "reduce_local":
        out[4], out[5] = n, 1.0
    else:
        raise CalibrationError(f"unknown operation {row['operation']!r}")
    return out


@dataclass(frozen=True)
class LinkFit:
    """One link's fitted α (s) and β (s/byte), None where no row informed it."""

    alpha_s: float | None
    beta_s_per_byte: float | None

    @property
    def latency_us(self) -> float | None:
        return None if self.alpha_s is None else self.alpha_s * 1e6

    @property
    def bandwidth_gbps(self) -> float | None:
        """Gigabits per second (the profile's unit) from β in s/byte."""
        if self.beta_s_per_byte is None or self.beta_s_per_byte <= 0:
            return None
        return 8.0 / (self.beta_s_per_byte * 1e9)


@dataclass(frozen=True)
class CommFit:
    """The α-β-γ fit, its per-row residuals and what it could not determine."""

    algorithm: str
    intra: LinkFit
    inter: LinkFit
    gamma_s_per_byte: float
    gamma_source: str                  # "reduce_local" (fitted) or "fixed"
    reduce_local_overhead_s: float
    operations: tuple[str, ...]        # operations in the joint fit
    residuals: list[dict[str, Any]]    # every row, fitted or not: measured, model, relative error
    pingpong: dict[str, LinkFit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    copy_s_per_byte: float | None = None   # δ, when horovod_allreduce_fused rows were fitted

    @property
    def reduce_gbytes_per_s(self) -> float:
        return 1.0 / (self.gamma_s_per_byte * 1e9)

    def rms_relative(self, operation: str = "allreduce") -> float:
        values = [r["relative"] for r in self.residuals if r["operation"] == operation and r["fitted"]]
        return math.sqrt(statistics.fmean(v * v for v in values)) if values else math.nan

    def max_relative(self, operation: str = "allreduce") -> float:
        values = [abs(r["relative"]) for r in self.residuals if r["operation"] == operation and r["fitted"]]
        return max(values) if values else math.nan

    def time(self, operation: str, nbytes: float, nodes: int, ranks_per_node: int) -> float:
        """The fitted model's seconds for one operation (the way the fit evaluated it)."""
        params = self.parameter_vector()
        row = {"operation": operation, "bytes": nbytes, "nodes": nodes, "ranks_per_node": ranks_per_node}
        if operation == "pingpong":
            link = self.pingpong.get(row_link(row))
            if link is None or link.alpha_s is None:
                raise CalibrationError(f"no ping-pong fit for the {row_link(row)}-node link")
            return link.alpha_s + link.beta_s_per_byte * nbytes
        return float(design_row(row, self.algorithm) @ params)

    def parameter_vector(self) -> np.ndarray:
        return np.array([self.intra.alpha_s or 0.0, self.inter.alpha_s or 0.0, self.intra.beta_s_per_byte or 0.0,
                         self.inter.beta_s_per_byte or 0.0, self.gamma_s_per_byte, self.reduce_local_overhead_s,
                         self.copy_s_per_byte or 0.0])

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the profile's ``calibration`` block and for printing."""
        out: dict[str, Any] = {"algorithm": self.algorithm, "operations_fitted": list(self.operations),
                               "gamma_source": self.gamma_source}
        for name, link in (("intra_node", self.intra), ("inter_node", self.inter)):
            if link.alpha_s is not None:
                out[name] = {"latency_us": link.latency_us, "beta_ns_per_byte": link.beta_s_per_byte * 1e9,
                             "bandwidth_gbps": link.bandwidth_gbps}
        out["gamma_ns_per_byte"] = self.gamma_s_per_byte * 1e9
        out["reduce_gbytes_per_s"] = self.reduce_gbytes_per_s
        out["reduce_local_overhead_us"] = self.reduce_local_overhead_s * 1e6
        if self.copy_s_per_byte is not None:
            out["fusion_copy_ns_per_byte"] = self.copy_s_per_byte * 1e9
        for op in self.operations:
            out[f"rms_relative_residual_{op}"] = self.rms_relative(op)
            out[f"max_relative_residual_{op}"] = self.max_relative(op)
        if self.pingpong:
            out["pingpong_diagnostic"] = {
                f"{k}_node": {"latency_us": v.latency_us, "bandwidth_gbps": v.bandwidth_gbps}
                for k, v in self.pingpong.items()}
        out["notes"] = list(self.notes)
        return _plain(out)


def _identifiable(matrix: np.ndarray, times: np.ndarray, columns: Sequence[int]) -> bool:
    weighted = matrix[:, columns] / times[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    if np.any(norms == 0) or weighted.shape[0] < weighted.shape[1]:
        return False
    singular = np.linalg.svd(weighted / norms, compute_uv=False)
    return bool(singular[-1] > 1e-8 * singular[0])


def fit_comm(rows: Iterable[dict[str, Any]], algorithm: str = "ring", gamma_s_per_byte: float | None = None,
             default_gamma_s_per_byte: float = DEFAULT_GAMMA_S_PER_BYTE,
             operations: Sequence[str] | None = None, min_bytes: float = 0, max_bytes: float = math.inf,
             horovod_wait_s: float = 0.0, horovod_cycle_s: float = 0.0) -> CommFit:
    """Fit α (per link), β (per link) and γ to bench-comm rows (see the module docstring).

    ``operations`` default: :func:`default_operations`. ``gamma_s_per_byte`` fixes γ (else it is fitted when
    ``reduce_local`` rows are present, else fixed at ``default_gamma_s_per_byte``). Rows outside
    [min_bytes, max_bytes] are reported but not fitted. ``horovod_wait_s`` is subtracted from every
    ``horovod_allreduce`` time before the fit (:func:`horovod_cycle_wait_s`). Horovod rows shorter than
    :data:`PACED_CYCLES` cycles of ``horovod_cycle_s`` are not fitted, and α of a link is then the ping-pong
    α when ping-pong rows measured it (module docstring, "Horovod's cycle").
    """
    check_algorithm(algorithm)
    all_rows = [r for r in rows if row_time(r) > 0]
    if not all_rows:
        raise CalibrationError("no bench-comm rows with a positive time")
    if operations is None:
        operations = default_operations(all_rows)
    unknown = [op for op in operations if op not in CSV_OPERATIONS]
    if unknown:
        raise CalibrationError(f"unknown operation(s) to fit: {', '.join(unknown)}")
    if not 0 <= horovod_wait_s < math.inf:
        raise CalibrationError(f"horovod_wait_s must be >= 0, got {horovod_wait_s!r}")
    if not 0 <= horovod_cycle_s < math.inf:
        raise CalibrationError(f"horovod_cycle_s must be >= 0, got {horovod_cycle_s!r}")
    notes: list[str] = []
    paced = [r["operation"] in HOROVOD_OPERATIONS and row_time(r) < PACED_CYCLES * horovod_cycle_s for r in all_rows]
    use = [(r["operation"] in operations and min_bytes <= r["bytes"] <= max_bytes and not slow
            and not (r["operation"] in ALLREDUCE_OPERATIONS and int(r["ranks"]) < 2))
           for r, slow in zip(all_rows, paced, strict=True)]
    fit_rows = [r for r, u in zip(all_rows, use, strict=True) if u]
    if any(p and r["operation"] in operations for r, p in zip(all_rows, paced, strict=True)):
        notes.append(f"Horovod rows under {PACED_CYCLES} cycles ({PACED_CYCLES * horovod_cycle_s * 1e3:g} ms) not "
                     "fitted: their time is the background thread's cycle, not the collective's")
    pingpong = fit_pingpong(all_rows, min_bytes, max_bytes)
    if not any(r["operation"] in ALLREDUCE_OPERATIONS for r in fit_rows):
        if any(paced):
            raise CalibrationError(f"every Horovod allreduce row took under {PACED_CYCLES} Horovod cycles "
                                   f"({PACED_CYCLES * horovod_cycle_s * 1e3:g} ms), which paces it: nothing to fit; "
                                   "bench larger messages (--max-bytes)")
        raise CalibrationError("no multi-rank allreduce rows to fit (run bench-comm or bench-hvd with at least "
                               f"2 ranks; fitting {', '.join(operations)})")
    matrix = np.array([design_row(r, algorithm) for r in fit_rows])
    times = np.array([row_time(r) for r in fit_rows])
    offsets = np.array([_offset(r, horovod_wait_s) for r in fit_rows])
    active = [j for j in range(len(PARAMETERS)) if np.any(matrix[:, j] != 0)]
    gamma_column = PARAMETERS.index("gamma_s_per_byte")
    fixed: dict[int, float] = {}
    # Without the short Horovod rows α is weakly determined: a collective's per-message latency cannot exceed a
    # message's one-way time, so the ping-pong latency bounds it (applied after the fit, below).
    alpha_caps: dict[int, tuple[str, int, float]] = {}
    if horovod_cycle_s > 0 and any(r["operation"] in HOROVOD_OPERATIONS for r in fit_rows):
        for name, (alpha_column, _) in LINK_COLUMNS.items():
            latency = pingpong_latency(all_rows, name)
            if alpha_column in active and latency is not None:
                alpha_caps[alpha_column] = (name, *latency)
            elif alpha_column in active:
                notes.append(f"{name}-node alpha fitted from Horovod rows of {PACED_CYCLES} cycles or more only: "
                             "weakly determined (add pingpong rows to bound it)")
    if gamma_s_per_byte is not None:
        fixed[gamma_column] = gamma_s_per_byte
        gamma_source = "fixed"
        notes.append(f"gamma fixed by the caller at {gamma_s_per_byte * 1e9:.4g} ns/byte")
    elif not _identifiable(matrix, times, active):
        default = default_gamma_s_per_byte
        fixed[gamma_column] = default
        gamma_source = "fixed"
        notes.append("beta and gamma are collinear in allreduce times (the bandwidth terms are (p-1)/p*n*(2*beta "
                     "+ gamma) for every p) and no reduce_local rows pin gamma: gamma fixed at "
                     f"{default * 1e9:.4g} ns/byte ({1 / default / 1e9:.3g} GB/s); beta is the remainder of the "
                     "fitted per-byte cost")
    else:
        gamma_source = "reduce_local" if any(r["operation"] == "reduce_local" for r in fit_rows) else "allreduce"
    solution = _solve(matrix, times, offsets, active, fixed)
    over = {j: cap for j, cap in alpha_caps.items() if solution[j] > cap[2]}
    if over:
        for j, (name, nbytes, latency) in over.items():
            fixed[j] = latency
            notes.append(f"{name}-node alpha fitted {solution[j] * 1e6:.3g} us, above the ping-pong latency "
                         f"({latency * 1e6:.3g} us one way for {nbytes} B): set to it, the rest refitted")
        solution = _solve(matrix, times, offsets, active, fixed)
    links = {}
    for name, (a, b) in LINK_COLUMNS.items():
        if a in active or b in active:
            links[name] = LinkFit(float(solution[a]), float(solution[b]))
            if solution[b] <= 0:
                notes.append(f"{name}-node beta fitted as 0 (the per-byte cost is all gamma): check the rows")
        else:
            links[name] = LinkFit(None, None)
    residuals = []
    for row, used in zip(all_rows, use, strict=True):
        model = (float(design_row(row, algorithm) @ solution) + _offset(row, horovod_wait_s)
                 if row["operation"] != "pingpong" else math.nan)
        residuals.append({"operation": row["operation"], "ranks": int(row["ranks"]), "nodes": int(row["nodes"]),
                          "bytes": int(row["bytes"]), "measured_s": row_time(row), "model_s": model,
                          "relative": (model / row_time(row) - 1.0) if not math.isnan(model) else math.nan,
                          "fitted": bool(used)})
    for residual in residuals:
        if residual["operation"] == "pingpong":
            link = pingpong.get("inter" if residual["nodes"] > 1 else "intra")
            if link is not None:
                residual["model_s"] = link.alpha_s + link.beta_s_per_byte * residual["bytes"]
                residual["relative"] = residual["model_s"] / residual["measured_s"] - 1.0
    return CommFit(algorithm=algorithm, intra=links["intra"], inter=links["inter"],
                   gamma_s_per_byte=float(solution[gamma_column]), gamma_source=gamma_source,
                   reduce_local_overhead_s=float(solution[OVERHEAD_COLUMN]), operations=tuple(operations),
                   copy_s_per_byte=float(solution[COPY_COLUMN]) if COPY_COLUMN in active else None,
                   residuals=residuals, pingpong=pingpong, notes=notes)


def _solve(matrix: np.ndarray, times: np.ndarray, offsets: np.ndarray, active: Sequence[int],
           fixed: dict[int, float]) -> np.ndarray:
    """The parameter vector: ``fixed`` columns as given, the other active ones by relative-error NNLS."""
    free = [j for j in active if j not in fixed]
    target = times - offsets - sum((matrix[:, j] * v for j, v in fixed.items()), np.zeros_like(times))
    if not _identifiable(matrix, times, free):
        raise CalibrationError("the rows cannot determine the parameters: give at least two message sizes per "
                               "link (and reduce_local rows or a fixed gamma)")
    if np.any(target <= 0):
        raise CalibrationError("the fixed gamma (and the Horovod cycle wait) alone exceed some measured allreduce "
                               "times: too large")
    solution = np.zeros(len(PARAMETERS))
    for j, v in fixed.items():
        solution[j] = v
    # Relative errors of the *measured* times: weight by t, fit the remainder after the fixed terms.
    solution[free] = _fit_relative_to(matrix[:, free], target, times)
    return solution


def row_time(row: dict[str, Any]) -> float:
    """The time a row contributes to the fit: the median over repetitions, except for Horovod's allreduce.

    Horovod's path is what a training step pays, and a step's time-to-train is the *sum* of its calls: over
    TCP here its calls were bimodal (a 64 MiB call took either about the link time or 1.5 times it), where a
    median picks one mode and predicts the sum wrong. The mean over repetitions is what sums up.
    """
    if row["operation"] in HOROVOD_OPERATIONS and row.get("mean_s") not in (None, ""):
        return float(row["mean_s"])
    return float(row["median_s"])


def _offset(row: dict[str, Any], horovod_wait_s: float) -> float:
    """Time in a row that no model parameter explains: the cycle wait of a Horovod call."""
    return horovod_wait_s if row["operation"] in HOROVOD_OPERATIONS else 0.0


def _fit_relative_to(matrix: np.ndarray, target: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """NNLS of ``matrix·x ≈ target`` with each row's error relative to the *measured* time."""
    from scipy.optimize import nnls

    weighted = matrix / measured[:, None]
    scale = np.linalg.norm(weighted, axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(weighted / scale, target / measured, maxiter=50 * matrix.shape[1])
    return solution / scale


def pingpong_latency(rows: Iterable[dict[str, Any]], link: str) -> tuple[int, float] | None:
    """A link's latency the OSU way: the one-way time of its smallest ping-pong message (bytes, seconds; the
    median over rows of that size). Not a fit: over the tbf-limited veth the 256 KiB-1 MiB ping-pongs ran at
    13-16 ns/B against 8.5 beyond, and a line through them put 1.6 ms into α."""
    mine = [r for r in rows if r["operation"] == "pingpong" and row_link(r) == link and float(r["median_s"]) > 0]
    if not mine:
        return None
    smallest = min(int(r["bytes"]) for r in mine)
    return smallest, statistics.median(float(r["median_s"]) for r in mine if int(r["bytes"]) == smallest)


def fit_pingpong(rows: Iterable[dict[str, Any]], min_bytes: float = 0, max_bytes: float = math.inf
                 ) -> dict[str, LinkFit]:
    """Per link, α and β of the one-way ping-pong time ``α + n·β`` (relative-error NNLS)."""
    out: dict[str, LinkFit] = {}
    by_link: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["operation"] == "pingpong" and min_bytes <= r["bytes"] <= max_bytes and float(r["median_s"]) > 0:
            by_link.setdefault(row_link(r), []).append(r)
    for link, group in by_link.items():
        if len({r["bytes"] for r in group}) < 2:
            continue
        matrix = np.array([[1.0, float(r["bytes"])] for r in group])
        times = np.array([float(r["median_s"]) for r in group])
        alpha, beta = _fit_relative_to(matrix, times, times)
        out[link] = LinkFit(float(alpha), float(beta))
    return out


# ------------------------------------------------------------------------------------------------- compute


def workload_key(model: str, image_size: int | None) -> str:
    """Key of ``compute.measured_images_per_s`` (:func:`analysis.compute.measured_key`, where predictions read it)."""
    from analysis.compute import measured_key

    return measured_key(model, image_size)


@dataclass(frozen=True)
class RunMeasurement:
    """One training run's measured steps (warm-up excluded), reduced to robust per-step numbers."""

    path: str
    model: str
    image_size: int | None
    ranks: int
    batch_per_rank: int
    threads_per_rank: int | None
    steps_measured: int
    step_s: float                 # median over steps of the slowest rank's step_s
    step_s_mean: float
    busy_s: float                 # median over steps of the slowest rank's step_s − allreduce_s
    allreduce_s: float            # median over steps of the slowest rank's allreduce_s
    compute_s: float
    optimizer_s: float
    data_s: float
    # Where and when it ran, and its measured steps (the slowest rank's times, :data:`STEP_TIMES`): what
    # :func:`pace_side_by_side` needs. Empty for a measurement built by hand.
    hosts: tuple[str, ...] = ()
    started_at: str | None = None
    finished_at: str | None = None
    steps: tuple[dict[str, float], ...] = field(default=(), repr=False, compare=False)
    # What the trainer saw (summary backend.allreduce_overlap): "layerwise", "none" (a compiled backward
    # handed every gradient over at its end) or None (not recorded).
    allreduce_overlap: str | None = None
    # Runs combined into this measurement by pace_side_by_side (1: it ran on its own or is one run).
    side_by_side: int = 1

    @property
    def images_per_s(self) -> float:
        """One rank's throughput without communication: b / (step − allreduce)."""
        return self.batch_per_rank / self.busy_s


# Per measured step, each the slowest rank's: busy_s is step_s − allreduce_s (the step without communication).
STEP_TIMES = ("step_s", "busy_s", "allreduce_s", "compute_s", "optimizer_s", "data_s")


def _slowest_per_step(sources: Sequence[Sequence[dict[str, Any]]], time_of=lambda step, name: step[name]
                      ) -> tuple[dict[str, float], ...]:
    """Step by step (paired by position; the shortest source sets the count), each of :data:`STEP_TIMES` at its
    maximum over the sources (the ranks of a run, or runs that ran side by side)."""
    count = min(len(source) for source in sources)
    return tuple({name: max(time_of(source[k], name) for source in sources) for name in STEP_TIMES}
                 for k in range(count))


def _step_log_time(record: dict[str, Any], name: str) -> float:
    """One of :data:`STEP_TIMES` from a step-log record (which has no busy_s)."""
    return record["step_s"] - record["allreduce_s"] if name == "busy_s" else record[name]


def _with_steps(run: RunMeasurement, steps: tuple[dict[str, float], ...], **changes: Any) -> RunMeasurement:
    """``run`` with its step statistics recomputed from ``steps`` (medians; the step's mean too)."""
    def median(name: str) -> float:
        return statistics.median(s[name] for s in steps)

    return dataclasses.replace(
        run, steps=steps, steps_measured=len(steps), step_s=median("step_s"),
        step_s_mean=statistics.fmean(s["step_s"] for s in steps), busy_s=median("busy_s"),
        allreduce_s=median("allreduce_s"), compute_s=median("compute_s"), optimizer_s=median("optimizer_s"),
        data_s=median("data_s"), **changes)


def pace_side_by_side(runs: Sequence[RunMeasurement]) -> tuple[list[RunMeasurement], list[str]]:
    """Runs of one workload that ran side by side on the same host(s) become one measurement, paced by the slowest.

    Calibration runs one 1-rank run per device at once so that each device is measured with its neighbours
    busy, as in a multi-rank run. But a synchronous data-parallel step ends when its slowest rank ends, and the
    devices of a node need not be equal: here the two cores' side-by-side ResNet-50 runs took 0.25-0.27 s and
    0.35-0.40 s a step, and the 2-rank run followed the slower one. The mean of the two rates predicts a rank
    nobody waits for. So runs with the same model, image size, per-rank batch, ranks and threads, the same
    hosts, and overlapping start-finish times are combined step by step (paired by position, the first
    measured steps together; the shorter run sets the count): each step time is the maximum over the runs.
    Runs without hosts, times or steps are left as they are. Returns the runs and one note per combination.
    """
    def key(run: RunMeasurement) -> tuple:
        return (run.model, run.image_size, run.batch_per_rank, run.ranks, run.threads_per_rank, run.hosts)

    def span(run: RunMeasurement) -> tuple[_dt.datetime, _dt.datetime]:
        return _dt.datetime.fromisoformat(run.started_at), _dt.datetime.fromisoformat(run.finished_at)

    eligible = [r for r in runs if r.hosts and r.started_at and r.finished_at and r.steps]
    groups: list[list[RunMeasurement]] = []
    for run in sorted(eligible, key=lambda r: (repr(key(r)), span(r)[0])):
        last = groups[-1] if groups else None
        if last and key(last[0]) == key(run) and span(run)[0] < max(span(r)[1] for r in last):
            last.append(run)
        else:
            groups.append([run])
    combined = {id(group[0]): group for group in groups if len(group) > 1}
    grouped = {id(r) for group in combined.values() for r in group}
    out: list[RunMeasurement] = []
    notes: list[str] = []
    for run in runs:
        if id(run) in combined:
            group = combined[id(run)]
            steps = _slowest_per_step([r.steps for r in group])
            paths = " + ".join(r.path for r in group)
            out.append(_with_steps(run, steps, path=paths, started_at=min(r.started_at for r in group),
                                   finished_at=max(r.finished_at for r in group), side_by_side=len(group)))
            rates = ", ".join(f"{r.images_per_s:.3g}" for r in group)
            notes.append(f"{len(group)} runs of {workload_key(run.model, run.image_size)} at b={run.batch_per_rank} "
                         f"ran side by side on {','.join(run.hosts)} ({paths}): combined step by step, the slowest "
                         f"per step (a synchronous step waits for its slowest rank): {out[-1].images_per_s:.3g} "
                         f"images/s, the runs alone {rates}")
        elif id(run) not in grouped:
            out.append(run)
    return out, notes


def runs_alone(runs: Sequence[RunMeasurement]) -> list[RunMeasurement]:
    """The runs that overlapped no other run in time (start-finish), whatever the workload: each had its node to
    itself, apart from what else the machine ran. Runs without times are never alone (unknown)."""
    def span(run: RunMeasurement) -> tuple[_dt.datetime, _dt.datetime] | None:
        if not (run.started_at and run.finished_at):
            return None
        return _dt.datetime.fromisoformat(run.started_at), _dt.datetime.fromisoformat(run.finished_at)

    spans = [span(r) for r in runs]
    alone = []
    for i, (run, own) in enumerate(zip(runs, spans, strict=True)):
        if own is None:
            continue
        if all(other is None or other[1] <= own[0] or own[1] <= other[0]
               for j, other in enumerate(spans) if j != i):
            alone.append(run)
    return alone


def partial_node_speedup(side_by_side: Sequence[RunMeasurement], alone: Sequence[RunMeasurement]
                         ) -> tuple[float | None, list[str]]:
    """How much faster a device runs alone than beside its busy neighbours: the geometric mean, over the
    workloads and batches measured both ways, of (side-by-side step time / alone step time); None when no
    workload was measured both ways. Notes name each pair."""
    loaded = {(r.model, r.image_size, r.batch_per_rank): r for r in side_by_side if r.side_by_side > 1}
    ratios, notes = [], []
    for run in alone:
        other = loaded.get((run.model, run.image_size, run.batch_per_rank))
        if other is None:
            continue
        ratios.append(other.busy_s / run.busy_s)
        notes.append(f"{workload_key(run.model, run.image_size)} b={run.batch_per_rank}: {run.busy_s:.4g} s a step "
                     f"alone, {other.busy_s:.4g} s side by side ({ratios[-1]:.3g}x)")
    if not ratios:
        return None, notes
    factor = math.exp(statistics.fmean(math.log(x) for x in ratios))
    notes.append(f"partial_node_speedup {factor:.3g} (geometric mean of {len(ratios)}): a node's devices run this "
                 "much faster when the others idle")
    return factor, notes


@dataclass(frozen=True)
class InputProblem:
    """Something in the inputs that calibrate skipped: one step-log line, or a whole run directory."""

    path: str
    line: int | None
    reason: str
    what: str                     # "line skipped" | "run skipped" | "steps missing"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason} ({self.what})"


def read_run(run_dir: str | Path, warmup_steps: int | None = None,
             problems: list[InputProblem] | None = None) -> RunMeasurement:
    """Summary + step logs of a run directory (``scaling/`` schema); ValueError names what is wrong.

    Without ``problems`` the first malformed step-log line is an error (file:line); with a list, each malformed
    line is appended to it and skipped. Ranks are paired by step number, so a skipped line never pairs one
    rank's step k with another rank's step k + 1.
    """
    from larscale.runformat import validate_step, validate_summary

    root = Path(run_dir)
    summary_path = root / "summary.json"
    if not summary_path.exists():
        raise CalibrationError(f"{root}: no summary.json (not a larscale run directory)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{summary_path}:{err.lineno}: not JSON ({err.msg})") from None
    try:
        validate_summary(summary)
    except ValueError as err:
        raise CalibrationError(f"{summary_path}: {err}") from None
    files = sorted((root / "steps").glob("rank-*.jsonl"))
    if not files:
        raise CalibrationError(f"{root}: no steps/rank-*.jsonl step logs")
    by_rank: list[dict[int, dict[str, Any]]] = []
    for path in files:
        records = {}
        lines = path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = validate_step(json.loads(line))
            except json.JSONDecodeError as err:
                reason = f"not JSON ({err.msg}{'; a torn last line' if number == len(lines) else ''})"
            except ValueError as err:
                reason = str(err)
            else:
                records[record["step"]] = record
                continue
            if problems is None:
                raise CalibrationError(f"{path}:{number}: {reason}")
            problems.append(InputProblem(str(path), number, reason, "line skipped"))
        # A complete run logs every step once per rank: fewer is a log cut at a line boundary (no bad line).
        if problems is not None and summary.get("status") == "complete" and len(records) != summary["steps_done"]:
            problems.append(InputProblem(str(path), None, f"{len(records)} valid step record(s), the summary says "
                                         f"{summary['steps_done']} step(s) done (truncated or damaged log)",
                                         "steps missing"))
        by_rank.append(records)
    common = sorted(set.intersection(*(set(records) for records in by_rank)))
    per_rank = [[records[s] for s in common] for records in by_rank]
    skip = summary.get("warmup_steps_excluded", 0) if warmup_steps is None else warmup_steps
    first_step = common[0] if common else 0
    per_rank = [[r for r in records if r["step"] >= first_step + skip] for records in per_rank]
    if min(len(r) for r in per_rank) < 1:
        raise CalibrationError(f"{root}: no steps left after excluding {skip} warm-up step(s)")
    config = summary.get("config") or {}
    blank = RunMeasurement(
        path=str(root), model=str(summary["model"]), image_size=config.get("image_size"),
        ranks=int(summary["ranks"]), batch_per_rank=int(summary["batch_per_rank"]),
        threads_per_rank=summary.get("threads_per_rank"), steps_measured=0, step_s=math.nan, step_s_mean=math.nan,
        busy_s=math.nan, allreduce_s=math.nan, compute_s=math.nan, optimizer_s=math.nan, data_s=math.nan,
        hosts=tuple(sorted(str(h) for h in summary.get("hosts") or ())), started_at=summary.get("started_at"),
        finished_at=summary.get("finished_at"),
        allreduce_overlap=(summary.get("backend") or {}).get("allreduce_overlap"))
    return _with_steps(blank, _slowest_per_step(per_rank, _step_log_time))


def read_runs(run_dirs: Sequence[str | Path], warmup_steps: int | None = None
              ) -> tuple[list[RunMeasurement], list[InputProblem]]:
    """Every usable run of ``run_dirs``, and what was skipped: malformed lines (file:line) and runs that cannot
    be used at all (no or broken summary, no step logs, no measured step). Nothing is dropped unreported."""
    runs: list[RunMeasurement] = []
    problems: list[InputProblem] = []
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, warmup_steps, problems))
        except CalibrationError as err:
            problems.append(InputProblem(str(run_dir), None, str(err), "run skipped"))
    return runs, problems


@dataclass(frozen=True)
class RooflinePoint:
    """The roofline model's seconds for one run's step, unfitted: ``device_s`` at efficiency_scale 1 without
    small-batch starvation, ``host_s`` of host time that adds to it (CPU), ``batch_per_device`` x."""

    device_s: float
    host_s: float
    batch_per_device: float


@dataclass(frozen=True)
class ComputeFit:
    sustained_fraction: float
    half_efficiency_batch: float
    measured_images_per_s: dict[str, dict[int, float]]
    runs: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # The roofline model's fit (when the base profile uses it): measured ÷ modelled rate, and the per-device
    # batch at which small batches halve the rate.
    efficiency_scale: float | None = None
    roofline_half_batch: float | None = None
    partial_node_speedup: float | None = None     # measured from runs alone beside runs side by side

    def rms_relative(self) -> float:
        values = [r["relative"] for r in self.runs]
        return math.sqrt(statistics.fmean(v * v for v in values)) if values else math.nan

    def summary(self) -> dict[str, Any]:
        out = {"sustained_fraction": self.sustained_fraction,
               "half_efficiency_batch": self.half_efficiency_batch,
               "rms_relative_residual": self.rms_relative(),
               "max_relative_residual": max((abs(r["relative"]) for r in self.runs), default=math.nan),
               "runs": self.runs, "notes": list(self.notes)}
        if self.efficiency_scale is not None:
            out["roofline"] = {"efficiency_scale": self.efficiency_scale,
                               "half_efficiency_batch": self.roofline_half_batch}
        if self.partial_node_speedup is not None:
            out["partial_node_speedup"] = self.partial_node_speedup
        return _plain(out)


def _line_through(x: np.ndarray, y: np.ndarray, default_intercept_over_slope: float, what: str,
                  notes: list[str]) -> tuple[float, float]:
    """``(1/slope, intercept/slope)`` of a relative-error line ``y = x/k + h/k`` through the points (k, h);
    with one x only, or when the points do not rise with x (noise on a shared machine inverted two nearby
    batches), h is kept at the default and k fitted alone, and a note says so."""
    half = default_intercept_over_slope
    if len(set(x.tolist())) >= 2:
        slope, intercept = _fit_relative_to(np.column_stack([x, np.ones_like(x)]), y, y)
        if slope > 0:
            return 1.0 / slope, intercept / slope
        notes.append(f"{what}: the step times do not grow with the batch (noise): half-efficiency batch kept at "
                     f"{half:g}, the rate fitted alone")
    else:
        notes.append(f"one per-rank batch only: {what} half-efficiency batch kept at {half:g}, the rate fitted")
    return float(np.median((x + half) / y)), half


def fit_compute(runs: Sequence[RunMeasurement], peak_flops_per_device: float, cores_per_device: float = 1.0,
                default_half_efficiency_batch: float = 4.0, notes: Sequence[str] = (),
                roofline: Callable[[RunMeasurement], RooflinePoint] | None = None,
                default_roofline_half_batch: float = 0.0) -> ComputeFit:
    """Measured images/s per (model, batch) and the FLOP model's s and h fitted to all runs at once.

    ``cores_per_device`` turns a run's threads into the devices it drove (CPU profiles count cores or
    sockets as devices); a run without a thread count drives one device. ``notes`` (e.g. from
    :func:`pace_side_by_side`) head the fit's notes.

    With ``roofline`` (the base profile's model, one :class:`RooflinePoint` per run) the roofline model is
    fitted too: ``t − H = R·(1 + h/x)/k`` is a line in x, ``(t − H)·x/R = x/k + h/k``, giving the
    efficiency scale k and the half-efficiency batch h per device.
    """
    from analysis.workload import load_workload

    if not runs:
        raise CalibrationError("no training runs to fit compute from")
    measured: dict[str, dict[int, list[float]]] = {}
    points = []
    for run in runs:
        key = workload_key(run.model, run.image_size)
        measured.setdefault(key, {}).setdefault(run.batch_per_rank, []).append(run.images_per_s)
        workload = load_workload(run.model, run.image_size)
        devices = max(1.0, (run.threads_per_rank or cores_per_device) / cores_per_device)
        # y = t·d·P/F = b/s + h/s : a line in b.
        y = run.busy_s * devices * peak_flops_per_device / workload.flops_per_image
        points.append((run, key, workload.flops_per_image, devices, y))
    notes = list(notes)
    b = np.array([float(p[0].batch_per_rank) for p in points])
    y = np.array([p[4] for p in points])
    sustained, half = _line_through(b, y, default_half_efficiency_batch, "FLOP model", notes)
    scale = roofline_half = None
    modelled: dict[int, RooflinePoint] = {}
    if roofline is not None:
        modelled = {id(run): roofline(run) for run in runs}
        x = np.array([modelled[id(p[0])].batch_per_device for p in points])
        busy = np.array([p[0].busy_s - modelled[id(p[0])].host_s for p in points])
        if np.any(busy <= 0):
            raise CalibrationError("the roofline model's host time alone exceeds a measured step")
        yr = busy * x / np.array([modelled[id(p[0])].device_s for p in points])
        scale, roofline_half = _line_through(x, yr, default_roofline_half_batch, "roofline", notes)
        roofline_half = max(roofline_half, 0.0)
    records = []
    for run, key, flops, devices, _ in points:
        model_s = flops * (run.batch_per_rank + half) / (devices * peak_flops_per_device * sustained)
        record = {"run": run.path, "model": run.model, "key": key, "image_size": run.image_size,
                  "batch_per_rank": run.batch_per_rank, "threads_per_rank": run.threads_per_rank,
                  "steps_measured": run.steps_measured, "busy_s": run.busy_s, "step_s": run.step_s,
                  "compute_s": run.compute_s, "optimizer_s": run.optimizer_s, "data_s": run.data_s,
                  "images_per_s": run.images_per_s, "flops_per_image": flops, "flop_model_s": model_s,
                  "relative": model_s / run.busy_s - 1.0}
        if scale is not None:
            point = modelled[id(run)]
            roofline_s = point.device_s * (1 + roofline_half / point.batch_per_device) / scale + point.host_s
            record.update(roofline_model_s=roofline_s, roofline_relative=roofline_s / run.busy_s - 1.0,
                          relative=roofline_s / run.busy_s - 1.0)
        records.append(record)
    if not 0 < sustained <= 1:
        notes.append(f"fitted sustained fraction {sustained:.3g} is outside (0, 1]: the profile's peak is too low; "
                     "clipped to 1")
        sustained = min(max(sustained, 1e-6), 1.0)
    # Repeated runs of one point: their step times are averaged (a time-to-train is a sum of steps), i.e. the
    # harmonic mean of their rates. A median picked one run of three when the machine drifted between them.
    table = {key: {batch: statistics.harmonic_mean(values) for batch, values in sorted(by_batch.items())}
             for key, by_batch in measured.items()}
    return ComputeFit(sustained_fraction=float(sustained), half_efficiency_batch=float(max(half, 0.0)),
                      measured_images_per_s=table, runs=records, notes=notes,
                      efficiency_scale=None if scale is None else float(scale),
                      roofline_half_batch=None if roofline_half is None else float(roofline_half))


def roofline_point_of(base, cores_per_device: float = 1.0) -> Callable[[RunMeasurement], RooflinePoint]:
    """The unfitted roofline model of ``base`` (a MachineProfile) for runs: what :func:`fit_compute` fits."""
    from analysis.params import PerfParams
    from analysis.roofline import roofline_curves
    from analysis.workload import load_workload

    params = PerfParams.from_machine(base).replace(efficiency_scale=1.0)

    def point(run: RunMeasurement) -> RooflinePoint:
        curves = roofline_curves(load_workload(run.model, run.image_size).layers, params.rates)
        devices = max(1.0, (run.threads_per_rank or cores_per_device) / cores_per_device)
        x = run.batch_per_rank / devices
        device_s = float(curves.forward(x) + curves.backward(x)) + curves.fixed_s
        host_s = 0.0 if params.host_overlapped else curves.host_ops * params.host_s_per_op
        return RooflinePoint(device_s=device_s, host_s=host_s, batch_per_device=x)
    return point


# ------------------------------------------------------------------------------------------------- profile


def calibrated_profile(base, comm: CommFit | None = None, compute: ComputeFit | None = None,
                       name: str | None = None, inputs: dict[str, Any] | None = None,
                       overlap: tuple[str, str] | None = None) -> dict[str, Any]:
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
        block["network_residuals"] = _plain(comm.residuals)
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
        block["compute"] = compute.summary()
    if overlap is not None:
        data["network"]["overlap"] = overlap[0]
        block["overlap"] = {"network.overlap": overlap[0], "source": overlap[1]}
    # Not identifiable from the inputs: 1-rank runs have no communication and bench-comm has no compute, so
    # how much of the allreduce hides behind the backward pass is the base profile's physical statement.
    block["from_base_profile"] = overlap_fractions(base)
    data["calibration"] = _plain(block)
    data["sources"] = [*data.get("sources", []), "larscale calibrate (see calibration)"]
    parse_machine(_plain(data), source=data["name"])        # the result must load as a profile
    return _plain(data)


def profile_yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=120)


def _plain(value: Any) -> Any:
    """numpy scalars and tuples → plain Python (YAML-safe); NaN stays a float."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, np.integer) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


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
