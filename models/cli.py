"""Subcommands of `larscale` that models owns (see larscale/__init__.py for the contract)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands. Handlers import heavy modules inside themselves."""
    p = subparsers.add_parser(
        "models",
        help="list the networks, print a network's per-layer parameter/MAC table, regenerate the tables",
        description="Without NAME: list the registered networks with their totals. With NAME: print its "
        "per-layer table (last layer first, the order gradients become ready in the backward pass) and its "
        "totals, per image: trainable parameters, forward conv/fc multiply-adds, fp32 output and gradient bytes. "
        "The packaged table (native size, 1000 classes) is shown unless --image-size/--num-classes ask for "
        "another, computed the same way.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="network name (omit to list them)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table: aligned text with totals; csv: the rows only; json: metadata, totals, rows")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the network's native one)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--regenerate", action="store_true",
                   help="rewrite the packaged tables (models/tables/*.json, *.csv) from the code")
    p.add_argument("--check", action="store_true", help="exit 1 if a packaged table differs from the code")
    p.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    from larscale import UsageError
    from models import tables

    if args.regenerate or args.check:
        if args.name:
            raise UsageError("--regenerate/--check act on every table: give no NAME")
        changed = tables.write_tables(check=args.check)
        for path in changed:
            print(f"{'differs' if args.check else 'wrote'}: {path}")
        if not changed:
            print(f"tables up to date in {tables.DATA_DIR}")
        return 1 if args.check and changed else 0
    if args.name is None:
        print(_listing())
        return 0
    try:
        if args.format == "json":
            text = tables.json_text(args.name, args.image_size, args.num_classes)
        elif args.format == "csv":
            text = tables.csv_text(args.name, args.image_size, args.num_classes)
        else:
            text = _text_table(args.name, tables.layer_table(args.name, args.image_size, args.num_classes))
    except ValueError as err:  # unknown name, wrong size for a fixed head, bad class count
        raise UsageError(str(err)) from None
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _listing() -> str:
    import models
    from models.tables import totals

    lines = [f"{'name':<12} {'input':>5} {'params':>12} {'GMAC':>7}  description"]
    for name in models.names():
        total = totals(name)
        lines.append(f"{name:<12} {models.input_size(name):>5} {total['params']:>12,} {total['macs'] / 1e9:>7.3f}  "
                     f"{models.describe(name)}")
    return "\n".join(lines)


def _text_table(name: str, rows: list) -> str:
    from models.tables import sum_rows

    header = ("layer", "kind", "output", "params", "MACs", "activation B", "gradient B")
    body = [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}",
             f"{r.activation_bytes:,}", f"{r.gradient_bytes:,}") for r in rows]
    total = sum_rows(rows)
    footer = ("total", "", "", f"{total['params']:,}", f"{total['macs']:,}", f"{total['activation_bytes']:,}",
              f"{total['gradient_bytes']:,}")
    widths = [max(len(line[i]) for line in (header, *body, footer)) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        cells = zip(line, widths, strict=True)
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    rule = "-" * len(fmt(header))
    summary = (f"{name}: {len(rows)} layers, last first (backward order); per image: "
               f"{total['params'] / 1e6:.2f} M parameters, {total['macs'] / 1e9:.3f} GMAC forward "
               f"({2 * total['macs'] / 1e9:.3f} GFLOP), gradients {total['gradient_bytes'] / 1e6:.1f} MB fp32, "
               f"layer outputs {total['activation_bytes'] / 1e6:.1f} MB fp32")
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(footer), summary])
