"""Build tools that bootstrap.sh runs from the repository root (``python -m tools.horovod_build``); not installed
with larscale."""
