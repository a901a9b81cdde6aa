"""The validation set's collective benchmarks: published allreduce bus bandwidths (nccl-tests) beside the model's,
the allreduce alone, with no training step around it (``larscale validate`` prints them after the training rows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.validation import VALIDATION_SET, cluster_machine, load_set, markdown


@dataclass(frozen=True)
class CollectiveRow:
    """A published allreduce bus bandwidth beside the model's (the allreduce alone, as nccl-tests times it)."""

    id: str
    cluster: str
    gpus: int
    nodes: int
    bytes: float
    split: str
    source: str
    published_gbytes_per_s: float
    predicted_gbytes_per_s: float
    error: float

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def collective_rows(path: Path = VALIDATION_SET) -> list[CollectiveRow]:
    """Every collective benchmark of the set: busbw = n/t · 2(p−1)/p with t the model's allreduce time."""
    from analysis.comm import allreduce_time, bus_bandwidth
    from analysis.params import PerfParams

    doc = load_set(path)
    out = []
    for row in doc.get("collectives", []):
        cluster = doc["clusters"][row["cluster"]]
        gpus, nodes = int(row["gpus"]), int(row["nodes"])
        machine = cluster_machine(cluster, "pytorch_ddp", "resnet50", 1, 1.0, gpus // nodes, nodes)
        params = PerfParams.from_machine(machine)
        seconds = allreduce_time(params.algorithm, float(row["bytes"]), nodes, gpus // nodes, params.link)
        predicted = float(bus_bandwidth(float(row["bytes"]), seconds, gpus)) / 1e9
        out.append(CollectiveRow(id=row["id"], cluster=row["cluster"], gpus=gpus, nodes=nodes,
                                 bytes=float(row["bytes"]), split=row["split"], source=row["source"],
                                 published_gbytes_per_s=float(row["busbw"]), predicted_gbytes_per_s=predicted,
                                 error=predicted / float(row["busbw"]) - 1.0))
    return out


def collective_table(rows: list[CollectiveRow]) -> str:
    return markdown(("id", "split", "GPUs", "nodes", "MiB", "published busbw (GB/s)", "predicted", "error", "source"),
                    [(r.id, r.split, str(r.gpus), str(r.nodes), f"{r.bytes / 2**20:,.0f}",
                      f"{r.published_gbytes_per_s:,.1f}", f"{r.predicted_gbytes_per_s:,.1f}", f"{r.error:+.1%}",
                      r.source) for r in rows])
