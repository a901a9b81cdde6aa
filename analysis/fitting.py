"""What the calibration fits share: their error, the relative-error least squares and YAML-safe numbers.

:mod:`analysis.fit_comm` (α, β, γ from bench-comm rows) and :mod:`analysis.fit_compute` (the compute model from
training runs) both fit on *relative* errors: measured times span orders of magnitude, and plain least squares
would fit the longest ones only.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class CalibrationError(ValueError):
    """The inputs cannot determine what was asked (too few sizes, no rows, a degenerate fit, an unusable run)."""


def fit_relative_to(matrix: np.ndarray, target: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """NNLS of ``matrix·x ≈ target`` with each row's error relative to the *measured* time."""
    from scipy.optimize import nnls

    weighted = matrix / measured[:, None]
    scale = np.linalg.norm(weighted, axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(weighted / scale, target / measured, maxiter=50 * matrix.shape[1])
    return solution / scale


def line_through(x: np.ndarray, y: np.ndarray, default_intercept_over_slope: float, what: str,
                 notes: list[str]) -> tuple[float, float]:
    """``(1/slope, intercept/slope)`` of a relative-error line ``y = x/k + h/k`` through the points (k, h);
    with one x only, or when the points do not rise with x (noise on a shared machine inverted two nearby
    batches), h is kept at the default and k fitted alone, and a note says so."""
    half = default_intercept_over_slope
    if len(set(x.tolist())) >= 2:
        slope, intercept = fit_relative_to(np.column_stack([x, np.ones_like(x)]), y, y)
        if slope > 0:
            return 1.0 / slope, intercept / slope
        notes.append(f"{what}: the step times do not grow with the batch (noise): half-efficiency batch kept at "
                     f"{half:g}, the rate fitted alone")
    else:
        notes.append(f"one per-rank batch only: {what} half-efficiency batch kept at {half:g}, the rate fitted")
    return float(np.median((x + half) / y)), half


def plain(value: Any) -> Any:
    """numpy scalars and tuples → plain Python (YAML-safe); NaN stays a float."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, np.integer) else k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
