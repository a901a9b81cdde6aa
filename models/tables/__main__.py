"""`python -m models.tables --write | --check`: regenerate or verify the packaged per-layer tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from models.tables import DATA_DIR, write_tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tables", description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"rewrite the tables in {DATA_DIR}")
    action.add_argument("--check", action="store_true", help="exit 1 if a packaged table differs from the code")
    args = parser.parse_args(argv)
    changed = write_tables(check=args.check)
    for path in changed:
        print(f"{'differs' if args.check else 'wrote'}: {path}")
    if args.check and changed:
        print("packaged tables are stale: run `python -m models.tables --write`", file=sys.stderr)
        return 1
    if not changed:
        print(f"tables up to date in {DATA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
