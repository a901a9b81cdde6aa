"""The communication fit of `larscale calibrate`: α, β per link, γ and δ from bench-comm / bench-hvd rows.

Each allreduce row of a ``larscale bench-comm`` CSV (n bytes, p = nodes·q ranks) is a linear
equation in the parameters (:func:`analysis.comm.allreduce_terms`, the same code that predicts):

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
shorter than a cycle is paced by it (it takes about one cycle whatever its size), and one just above a cycle
may wait for the next. Fitted, those rows would put part of the cycle into α, charged to every bucket of a
training step, where Horovod pays the cycle once per launch (modelled in analysis/overlap.py). So Horovod rows
under :data:`PACED_CYCLES` cycles are reported, not fitted. α is then fitted from the longer rows, weakly, and
bounded by the link's ping-pong latency (the least one-way time of its ping-pong messages,
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
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.comm import allreduce_terms, check_algorithm
from analysis.fitting import CalibrationError, fit_relative_to, plain
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
        return plain(out)


def _identifiable(matrix: np.ndarray, times: np.ndarray, columns: Sequence[int]) -> bool:
    weighted = matrix[:, columns] / times[:, None]
    norms = np.linalg.norm(weighted, axis=0)
    if np.any(norms == 0) or weighted.shape[0] < weighted.shape[1]:
        return False
    singular = np.linalg.svd(weighted / norms, compute_uv=False)
    return bool(singular[-1] > 1e-8 * singular[0])


@dataclass(frozen=True)
class CommFitOptions:
    """How :func:`fit_comm` reads its rows (the defaults: a fit without a base profile)."""

    algorithm: str = "ring"
    gamma_s_per_byte: float | None = None       # fixes γ; else fitted when reduce_local rows pin it, else the default
    default_gamma_s_per_byte: float = DEFAULT_GAMMA_S_PER_BYTE
    operations: tuple[str, ...] | None = None   # the operations fitted; None: default_operations(rows)
    min_bytes: float = 0                        # rows outside [min_bytes, max_bytes] are reported, not fitted
    max_bytes: float = math.inf
    horovod_wait_s: float = 0.0                 # subtracted from every Horovod row (horovod_cycle_wait_s)
    horovod_cycle_s: float = 0.0                # Horovod rows under PACED_CYCLES of it are not fitted

    @classmethod
    def for_profile(cls, base, **changes: Any) -> CommFitOptions:
        """The options a base profile (a MachineProfile) implies: its formula, its γ, its Horovod cycle."""
        net = base.network
        return dataclasses.replace(
            cls(algorithm=net.algorithm, default_gamma_s_per_byte=net.gamma_s_per_byte,
                horovod_wait_s=horovod_cycle_wait_s(net.cycle_time_ms), horovod_cycle_s=net.cycle_time_ms / 1e3),
            **changes)

    def paced(self, row: dict[str, Any]) -> bool:
        """A Horovod row shorter than :data:`PACED_CYCLES` cycles: its time is the background thread's cycle."""
        return row["operation"] in HOROVOD_OPERATIONS and row_time(row) < PACED_CYCLES * self.horovod_cycle_s


@dataclass(frozen=True)
class RowSelection:
    """The rows with a positive time, which of them the fit uses, and why others are left out."""

    rows: list[dict[str, Any]]
    used: list[bool]
    operations: tuple[str, ...]
    notes: list[str]

    @property
    def fitted(self) -> list[dict[str, Any]]:
        return [r for r, u in zip(self.rows, self.used, strict=True) if u]


def select_rows(rows: Iterable[dict[str, Any]], options: CommFitOptions) -> RowSelection:
    """The rows :func:`fit_comm` fits: the chosen operations within the byte range, multi-rank allreduces only,
    Horovod rows paced by the cycle left out (module docstring, "Horovod's cycle")."""
    check_algorithm(options.algorithm)
    all_rows = [r for r in rows if row_time(r) > 0]
    if not all_rows:
        raise CalibrationError("no bench-comm rows with a positive time")
    operations = tuple(default_operations(all_rows) if options.operations is None else options.operations)
    unknown = [op for op in operations if op not in CSV_OPERATIONS]
    if unknown:
        raise CalibrationError(f"unknown operation(s) to fit: {', '.join(unknown)}")
    if not 0 <= options.horovod_wait_s < math.inf:
        raise CalibrationError(f"horovod_wait_s must be >= 0, got {options.horovod_wait_s!r}")
    if not 0 <= options.horovod_cycle_s < math.inf:
        raise CalibrationError(f"horovod_cycle_s must be >= 0, got {options.horovod_cycle_s!r}")
    cycles_ms = PACED_CYCLES * options.horovod_cycle_s * 1e3
    paced = [options.paced(r) for r in all_rows]
    used = [(r["operation"] in operations and options.min_bytes <= r["bytes"] <= options.max_bytes and not slow
             and not (r["operation"] in ALLREDUCE_OPERATIONS and int(r["ranks"]) < 2))
            for r, slow in zip(all_rows, paced, strict=True)]
    notes = []
    if any(p and r["operation"] in operations for r, p in zip(all_rows, paced, strict=True)):
        notes.append(f"Horovod rows under {PACED_CYCLES} cycles ({cycles_ms:g} ms) not "
                     "fitted: their time is the background thread's cycle, not the collective's")
    selection = RowSelection(all_rows, used, operations, notes)
    if not any(r["operation"] in ALLREDUCE_OPERATIONS for r in selection.fitted):
        if any(paced):
            raise CalibrationError(f"every Horovod allreduce row took under {PACED_CYCLES} Horovod cycles "
                                   f"({cycles_ms:g} ms), which paces it: nothing to fit; "
                                   "bench larger messages (--max-bytes)")
        raise CalibrationError("no multi-rank allreduce rows to fit (run bench-comm or bench-hvd with at least "
                               f"2 ranks; fitting {', '.join(operations)})")
    return selection


@dataclass(frozen=True)
class CommSolution:
    """The fitted parameter vector (:data:`PARAMETERS`), the columns the rows informed and where γ came from."""

    vector: np.ndarray
    active: list[int]
    gamma_source: str                  # "reduce_local", "allreduce" (fitted) or "fixed"


def solve_comm(selection: RowSelection, options: CommFitOptions, notes: list[str]) -> CommSolution:
    """The relative-error NNLS over the selected rows, with γ fixed when the rows cannot separate it from β and
    each link's α bounded by its ping-pong latency when the short Horovod rows were left out."""
    fit_rows = selection.fitted
    matrix = np.array([design_row(r, options.algorithm) for r in fit_rows])
    times = np.array([row_time(r) for r in fit_rows])
    offsets = np.array([_offset(r, options.horovod_wait_s) for r in fit_rows])
    active = [j for j in range(len(PARAMETERS)) if np.any(matrix[:, j] != 0)]
    gamma_column = PARAMETERS.index("gamma_s_per_byte")
    fixed: dict[int, float] = {}
    # Without the short Horovod rows α is weakly determined: a collective's per-message latency cannot exceed a
    # message's one-way time, so the ping-pong latency bounds it (applied after the fit, below).
    alpha_caps: dict[int, tuple[str, int, float]] = {}
    if options.horovod_cycle_s > 0 and any(r["operation"] in HOROVOD_OPERATIONS for r in fit_rows):
        for name, (alpha_column, _) in LINK_COLUMNS.items():
            latency = pingpong_latency(selection.rows, name)
            if alpha_column in active and latency is not None:
                alpha_caps[alpha_column] = (name, *latency)
            elif alpha_column in active:
                notes.append(f"{name}-node alpha fitted from Horovod rows of {PACED_CYCLES} cycles or more only: "
                             "weakly determined (add pingpong rows to bound it)")
    if options.gamma_s_per_byte is not None:
        fixed[gamma_column] = options.gamma_s_per_byte
        gamma_source = "fixed"
        notes.append(f"gamma fixed by the caller at {options.gamma_s_per_byte * 1e9:.4g} ns/byte")
    elif not _identifiable(matrix, times, active):
        default = options.default_gamma_s_per_byte
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
    return CommSolution(solution, active, gamma_source)


def comm_residuals(selection: RowSelection, solution: np.ndarray, options: CommFitOptions,
                   pingpong: dict[str, LinkFit]) -> list[dict[str, Any]]:
    """Every row, fitted or not: measured and modelled seconds and the relative error (ping-pong rows against
    their own per-link fit)."""
    residuals = []
    for row, used in zip(selection.rows, selection.used, strict=True):
        model = math.nan
        if row["operation"] != "pingpong":
            model = float(design_row(row, options.algorithm) @ solution) + _offset(row, options.horovod_wait_s)
        elif (link := pingpong.get(row_link(row))) is not None:
            model = link.alpha_s + link.beta_s_per_byte * int(row["bytes"])
        measured = row_time(row)
        residuals.append({"operation": row["operation"], "ranks": int(row["ranks"]), "nodes": int(row["nodes"]),
                          "bytes": int(row["bytes"]), "measured_s": measured, "model_s": model,
                          "relative": (model / measured - 1.0) if not math.isnan(model) else math.nan,
                          "fitted": bool(used)})
    return residuals


def fit_comm(rows: Iterable[dict[str, Any]], options: CommFitOptions | None = None) -> CommFit:
    """Fit α (per link), β (per link), γ and δ to bench-comm rows (see the module docstring): the rows
    selected (:func:`select_rows`), solved (:func:`solve_comm`) and every row's residual."""
    options = options or CommFitOptions()
    selection = select_rows(rows, options)
    notes = list(selection.notes)
    pingpong = fit_pingpong(selection.rows, options.min_bytes, options.max_bytes)
    solved = solve_comm(selection, options, notes)
    solution = solved.vector
    links = {}
    for name, (a, b) in LINK_COLUMNS.items():
        if a in solved.active or b in solved.active:
            links[name] = LinkFit(float(solution[a]), float(solution[b]))
            if solution[b] <= 0:
                notes.append(f"{name}-node beta fitted as 0 (the per-byte cost is all gamma): check the rows")
        else:
            links[name] = LinkFit(None, None)
    return CommFit(algorithm=options.algorithm, intra=links["intra"], inter=links["inter"],
                   gamma_s_per_byte=float(solution[PARAMETERS.index("gamma_s_per_byte")]),
                   gamma_source=solved.gamma_source, reduce_local_overhead_s=float(solution[OVERHEAD_COLUMN]),
                   operations=selection.operations,
                   copy_s_per_byte=float(solution[COPY_COLUMN]) if COPY_COLUMN in solved.active else None,
                   residuals=comm_residuals(selection, solution, options, pingpong), pingpong=pingpong, notes=notes)


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
    solution[free] = fit_relative_to(matrix[:, free], target, times)
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


def pingpong_latency(rows: Iterable[dict[str, Any]], link: str) -> tuple[int, float] | None:
    """A bound on a link's latency: the least one-way time of any of its ping-pong messages (bytes, seconds).
    Not a fit: around a rate limiter's burst size the cost is not affine in the size, and a line through those
    ping-pongs puts milliseconds into α. Any message's one-way time ``α + n·β`` is at least α, so the least
    one seen bounds it.

    The least, not a median: a latency is a floor, and ping-pongs run while another process held a core read the
    peer's wake-up instead (a yielding rank waits for the scheduler: 0.77 ms against 13 µs in the other round,
    benchmarks/README.md; on a loaded machine every size's median was 1-4 ms while the fastest repetitions took
    1.5-8 µs). As the bound on α, such a median would be charged to every bucket. So each row gives its fastest
    repetition (``min_s``, a mean over that repetition's iterations; the median where a CSV has no minimum)."""
    floors = [(int(r["bytes"]), _fastest(r)) for r in rows if r["operation"] == "pingpong" and row_link(r) == link]
    floors = [(nbytes, t) for nbytes, t in floors if t > 0]
    if not floors:
        return None
    return min(floors, key=lambda floor: (floor[1], floor[0]))


def _fastest(row: dict[str, Any]) -> float:
    """A row's fastest repetition, or its median where the CSV has no minimum."""
    fastest = row.get("min_s")
    return float(fastest) if fastest not in (None, "") else float(row["median_s"])


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
        alpha, beta = fit_relative_to(matrix, times, times)
        out[link] = LinkFit(float(alpha), float(beta))
    return out
