"""`python -m larscale`: the `larscale` command."""

import sys

import larscale

sys.exit(larscale.main())
