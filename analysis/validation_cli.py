"""`larscale validate`: the model against the public validation set at scale (analysis/validation.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def register(subparsers: argparse._SubParsersAction) -> None:
    v = subparsers.add_parser(
        "validate", help="predict every published multi-GPU throughput of the validation set and print the errors",
        description="Predict each row of analysis/data/validation_scaling.yaml (published data-parallel "
        "throughputs, the published 1-GPU rate and the cluster's network facts) and print every row's error, "
        "then each split's summary (fit: the rows the model's constants were set on; held_out: the rest; rows of a "
        "source that disowns its figures, listed under not_scored in the set, are printed apart and counted in "
        "neither).")
    v.add_argument("--set", dest="path", default=None, help="another validation YAML of the same form")
    v.add_argument("--split", choices=("fit", "held_out"), default=None, help="print only this part's rows")
    v.add_argument("--format", choices=("text", "json"), default="text")
    v.add_argument("--cross-validate", action="store_true",
                   help="also predict each published table with the free constants fitted on every other table "
                   "(leave one table out over the fit grid: about a minute)")
    v.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.validation import (
        VALIDATION_SET,
        cross_validate,
        cross_validated_lines,
        cross_validated_table,
        grid_errors,
        held_out_by_origin,
        held_out_by_precision,
        node_step_lines,
        node_step_table,
        node_steps,
        summary,
        table,
        unscored_lines,
        validate_rows,
    )
    from analysis.validation_collectives import collective_rows, collective_table
    from larscale import UsageError

    path = Path(args.path) if args.path else VALIDATION_SET
    if not path.exists():
        raise UsageError(f"--set: {path} does not exist")
    try:
        rows = validate_rows(path)
        collectives = [r for r in collective_rows(path) if args.split is None or r.split == args.split]
    except (ValueError, KeyError) as err:
        raise UsageError(f"--set: {err}") from None
    shown = [r for r in rows if args.split is None or r.split == args.split]
    parts = summary(rows)
    origins = held_out_by_origin(rows) + held_out_by_precision(rows)
    steps = [s for s in node_steps(rows) if args.split is None or s.split == args.split]
    try:
        crossed = cross_validate(grid_errors(path)) if args.cross_validate else []
    except ValueError as err:
        raise UsageError(f"--set: {err}") from None
    if args.format == "json":
        print(json.dumps({"rows": [asdict(r) for r in shown], "collectives": [asdict(r) for r in collectives],
                          "summary": {k: asdict(v) for k, v in parts.items()},
                          "held_out_parts": [asdict(v) for v in origins],
                          "node_steps": [{**asdict(s), "error": s.error} for s in steps],
                          "cross_validated": [asdict(r) for r in crossed]}, indent=2))
        return 0
    print(table(shown))
    if collectives:
        print("\nAllreduce bus bandwidth (the collective alone):\n")
        print(collective_table(collectives))
    if steps:
        print("\nLeaving the node: each multi-node row's step over its series' single-node step (the 1-GPU rate "
              "cancels):\n")
        print(node_step_table(steps))
    print()
    for part in [*parts.values(), *origins]:
        print(part.line())
    for line in node_step_lines(steps):
        print(line)
    for line in unscored_lines(shown):
        print(line)
    if crossed:
        print("\nLeave one table out (each row predicted with the constants fitted on every other table):\n")
        print(cross_validated_table(crossed))
        print()
        for line in cross_validated_lines(crossed):
            print(line)
    return 0
