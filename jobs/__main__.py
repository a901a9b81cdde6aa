"""`python -m jobs`: this package's subcommands of the `larscale` command."""

import sys

import larscale

sys.exit(larscale.run(["jobs"], prog="python -m jobs"))
