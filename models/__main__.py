"""`python -m models`: this package's subcommands of the `larscale` command."""

import sys

import larscale

sys.exit(larscale.run(["models"], prog="python -m models"))
