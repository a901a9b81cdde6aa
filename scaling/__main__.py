"""`python -m scaling`: this package's subcommands of the `larscale` command."""

import sys

import larscale

sys.exit(larscale.run(["scaling"], prog="python -m scaling"))
