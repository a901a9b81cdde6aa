"""`larscale bench-import`: nccl-tests all_reduce_perf and OSU output, captured from real runs of those tools, into
the benchmark CSV that calibration reads. Each sample says where it was published; the lines are the tools' own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from larscale.benchformat import read_csv
from larscale.benchimport import BenchImportError, parse_nccl_tests, parse_osu
from tests.conftest import REPO

# (its longest line, kept whole, is split only in this file's source)
HEADER_LINE = ("# nThread 1 nGpus 1 minBytes 8192 maxBytes 8589934592 step: 2(factor) warmup iters: 10 iters: 100 "
               "agg iters: 1 validation: 1 graph: 0 unalign: 0\n")
# nccl-tests 2.20.0 all_reduce_perf on two DGX Spark (GB10) hosts, one GPU each: NVIDIA/dgx-spark-playbooks#103
# (https://github.com/NVIDIA/dgx-spark-playbooks/pull/103), the first rows of the table as posted.
NCCL_TWO_HOSTS = """\
# nccl-tests version 2.20.0 (b4d5bee) nccl-headers=23102 nccl-library=23102
# Collective test starting: all_reduce_perf
""" + HEADER_LINE + """\
#
# Using devices
#  Rank  0 Group  0 Pid 1666603 on spark-d708 device  0 [000f:01:00] NVIDIA GB10
#  Rank  1 Group  0 Pid 1669515 on spark-dbf4 device  0 [000f:01:00] NVIDIA GB10
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)
        8192          2048     float     sum      -1    35.15    0.23    0.23       0    30.33    0.27    0.27       0
       16384          4096     float     sum      -1    31.67    0.52    0.52       0    30.75    0.53    0.53       0
       32768          8192     float     sum      -1    39.56    0.83    0.83       0    37.44    0.88    0.88       0
       65536         16384     float     sum      -1    67.93    0.96    0.96       0    64.71    1.01    1.01       0
"""

# all_reduce_perf under mpirun -np 2 on 2 nodes, one H100 each (NCCL_ALGO=Tree), a log without its "Rank" lines:
# NVIDIA/nccl-tests#232 (https://github.com/NVIDIA/nccl-tests/issues/232), the table as posted.
NCCL_NO_RANK_LINES = """\
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     2097152        524288     float     sum      -1    113.2   18.53   18.53      0    93.35   22.46   22.46      0
     4194304       1048576     float     sum      -1    154.4   27.16   27.16      0    153.3   27.37   27.37      0
     8388608       2097152     float     sum      -1    231.4   36.24   36.24      0    227.8   36.83   36.83      0
    16777216       4194304     float     sum      -1    420.5   39.90   39.90      0    419.9   39.95   39.95      0
    33554432       8388608     float     sum      -1    812.3   41.31   41.31      0    808.2   41.52   41.52      0
"""

# OSU Micro-Benchmarks 7.3 osu_reduce -d cuda -f with 192 ranks: open-mpi/ompi#12318
# (https://github.com/open-mpi/ompi/pull/12318). The collective latency tests share this table; the title names
# the collective, so a reduce log is refused as an allreduce.
OSU_REDUCE = """\
# OSU MPI-CUDA Reduce Latency Test v7.3
# Datatype: MPI_CHAR.
# Size       Avg Latency(us)   Min Latency(us)   Max Latency(us)  Iterations
1                      53.34             24.80            158.96        1000
2                      52.71             23.64            127.55        1000
4                      52.65             23.31            125.60        1000
1024                   55.48             24.05            134.61        1000
"""


def test_nccl_tests_rows_ranks_and_hosts_from_the_log() -> None:
    rows = parse_nccl_tests(NCCL_TWO_HOSTS)
    assert [r["bytes"] for r in rows] == [8192, 16384, 32768, 65536]
    first = rows[0]
    assert (first["ranks"], first["nodes"], first["ranks_per_node"]) == (2, 2, 1)
    assert first["median_s"] == pytest.approx(35.15e-6) and first["busbw_gbytes_per_s"] == 0.23
    assert (first["elements"], first["dtype"], first["iterations_per_rep"]) == (2048, "float32", 100)
    assert {r["operation"] for r in rows} == {"allreduce"} and {r["mpi_library"] for r in rows} == {"nccl"}
    with pytest.raises(BenchImportError, match="shows 2 ranks, not 4"):
        parse_nccl_tests(NCCL_TWO_HOSTS, ranks=4)


def test_nccl_tests_without_rank_lines_needs_the_rank_count() -> None:
    with pytest.raises(BenchImportError, match="give the rank count"):
        parse_nccl_tests(NCCL_NO_RANK_LINES)
    rows = parse_nccl_tests(NCCL_NO_RANK_LINES, ranks=2, nodes=2)
    assert [r["bytes"] for r in rows] == [2097152 << i for i in range(5)]
    assert rows[-1]["median_s"] == pytest.approx(812.3e-6) and rows[-1]["algbw_gbytes_per_s"] == 41.31
    assert (rows[-1]["nodes"], rows[-1]["ranks_per_node"]) == (2, 1)
    # the tool's algbw is bytes / time (GB = 1e9 bytes): its columns and the time agree
    assert rows[-1]["bytes"] / rows[-1]["median_s"] / 1e9 == pytest.approx(rows[-1]["algbw_gbytes_per_s"], rel=0.01)


def test_osu_table_is_read_and_a_non_allreduce_test_refused() -> None:
    with pytest.raises(BenchImportError, match="OSU Reduce test, not osu_allreduce"):
        parse_osu(OSU_REDUCE, ranks=192)
    rows = parse_osu(OSU_REDUCE.replace("Reduce Latency", "Allreduce Latency"), ranks=192, nodes=2)
    assert [r["bytes"] for r in rows] == [1, 2, 4, 1024]
    last = rows[-1]
    assert (last["mean_s"], last["min_s"], last["max_s"]) == pytest.approx((55.48e-6, 24.05e-6, 134.61e-6))
    assert last["iterations_per_rep"] == 1000 and last["busbw_gbytes_per_s"] == pytest.approx(
        1024 / 55.48e-6 / 1e9 * 2 * 191 / 192)


def test_cli_writes_the_csv_calibration_reads(tmp_path: Path) -> None:
    log = tmp_path / "nccl.log"
    log.write_text(NCCL_TWO_HOSTS)
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-import", str(log), "--tool", "nccl-tests",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(out)
    assert len(rows) == 4 and rows[0]["ranks"] == 2 and rows[0]["operation"] == "allreduce"
    bad = subprocess.run([sys.executable, "-m", "larscale", "bench-import", str(log), "--tool", "osu", "--ranks",
                          "2", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "not OSU Micro-Benchmarks output" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bench_hvd_device_cuda_without_a_gpu_is_one_line() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.sh runs bench-hvd --device cuda there")
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-hvd", "--device", "cuda", "--ranks", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "--device cuda: this PyTorch" in proc.stderr and "sees no GPU" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "launching" not in proc.stdout
