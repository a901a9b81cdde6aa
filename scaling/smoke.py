"""A real multi-rank Horovod check: allreduce and broadcast in PyTorch and TensorFlow.

Run by each rank (``mpirun -np 2 python -m scaling.smoke``); `larscale smoke` launches it. Each rank
contributes a rank-dependent tensor, so a wrong reduction cannot pass: the sum over ranks r = 0..p-1 of
(r + 1)·[1, 2, 3] is p(p+1)/2·[1, 2, 3], known exactly in floating point for small p.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


def expected_sum(size: int) -> list[float]:
    return [size * (size + 1) / 2 * k for k in (1.0, 2.0, 3.0)]


def torch_checks() -> dict[str, object]:
    import horovod.torch as hvd
    import torch

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    mine = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * (rank + 1)
    total = hvd.allreduce(mine, op=hvd.Sum, name="smoke.sum").tolist()
    mean = hvd.allreduce(mine, op=hvd.Average, name="smoke.mean").tolist()
    sent = torch.full((4,), float(rank + 7), dtype=torch.float64)
    received = hvd.broadcast(sent, root_rank=0, name="smoke.bcast").tolist()
    return {
        "rank": rank,
        "size": size,
        "local_rank": hvd.local_rank(),
        "controller": "mpi" if hvd.mpi_enabled() else "gloo",
        "sum_ok": total == expected_sum(size),
        "mean_ok": mean == [v / size for v in expected_sum(size)],
        "broadcast_ok": received == [7.0] * 4,
        "sum": total,
    }


def tensorflow_checks() -> dict[str, object]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    mine = tf.constant([1.0, 2.0, 3.0], dtype=tf.float64) * float(rank + 1)
    total = hvd.allreduce(mine, op=hvd.Sum, name="smoke.tf.sum").numpy().tolist()
    mean = hvd.allreduce(mine, op=hvd.Average, name="smoke.tf.mean").numpy().tolist()
    variable = tf.Variable(tf.fill([4], float(rank + 7)))
    hvd.broadcast_variables([variable], root_rank=0)
    return {
        "rank": rank,
        "size": size,
        "controller": "mpi" if hvd.mpi_enabled() else "gloo",
        "sum_ok": total == expected_sum(size),
        "mean_ok": mean == [v / size for v in expected_sum(size)],
        "broadcast_ok": variable.numpy().tolist() == [7.0] * 4,
        "sum": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,tensorflow",
                        help="comma-separated subset of torch,tensorflow")
    args = parser.parse_args(argv)
    checks = {"torch": torch_checks, "tensorflow": tensorflow_checks}
    wanted = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in checks]
    if unknown:
        parser.error(f"unknown framework(s) {unknown}; choose from {sorted(checks)}")
    ok = True
    for framework in wanted:
        result = {"framework": framework, "host": socket.gethostname(), **checks[framework]()}
        ok &= bool(result["sum_ok"] and result["mean_ok"] and result["broadcast_ok"])
        # One JSON line per rank and framework, written in one call so lines of two ranks sharing the
        # launcher's pipe cannot interleave: the parent (and the tests) parse these.
        sys.stdout.write("SMOKE " + json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
