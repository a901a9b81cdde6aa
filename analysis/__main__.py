"""`python -m analysis`: this package's subcommands of the `larscale` command."""

import sys

import larscale

sys.exit(larscale.run(["analysis"], prog="python -m analysis"))
