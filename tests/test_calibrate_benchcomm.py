"""`larscale bench-comm`: statistics, CSV, and real multi-rank runs (self-launched and under mpirun)."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from larscale.benchformat import (
    CSV_COLUMNS,
    bandwidths,
    message_sizes,
    parse_bytes,
    read_csv,
    rows_to_csv,
    summarize,
    write_csv,
)
from scaling.launch import local_env, rank_command
from tests.conftest import REPO

QUICK = ["--max-bytes", "64K", "--factor", "4", "--warmup", "2", "--repetitions", "4", "--min-rep-ms", "0.2",
         "--max-seconds-per-size", "2"]


def test_message_sizes_double_from_4_bytes_and_end_at_the_maximum() -> None:
    assert message_sizes(4, 64) == [4, 8, 16, 32, 64]
    assert message_sizes(4, 100, 4) == [4, 16, 64, 100]
    assert message_sizes(6, 6) == [4]   # whole float32 elements only
    assert all(size % 4 == 0 for size in message_sizes(4, 64 << 20))
    assert message_sizes(4, 64 << 20)[-1] == 64 << 20


def test_parse_bytes_binary_suffixes_and_errors() -> None:
    assert parse_bytes("4") == 4
    assert parse_bytes("1K") == 1024
    assert parse_bytes("64MiB") == 64 << 20
    assert parse_bytes("1g") == 1 << 30
    for bad in ("x", "0", "1.5", "-4"):
        with pytest.raises(ValueError, match="byte count"):
            parse_bytes(bad)


def test_summary_is_mean_median_and_student_t_interval() -> None:
    samples = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = summarize(samples)
    assert s.mean == pytest.approx(4.0)
    assert s.median == 3.0
    assert s.std == pytest.approx(statistics.stdev(samples))
    # t(0.975, 4 dof) = 2.7764 (tables).
    half = 2.776445 * statistics.stdev(samples) / math.sqrt(5)
    assert (s.ci95_low, s.ci95_high) == pytest.approx((4.0 - half, 4.0 + half), rel=1e-4)
    assert (s.minimum, s.maximum) == (1.0, 10.0)
    with pytest.raises(ValueError, match="at least 2"):
        summarize([1.0])


def test_bus_bandwidth_follows_nccl_tests() -> None:
    # 1e9 bytes in 1 s on 4 ranks: algbw 1 GB/s, busbw 1 * 2 * 3 / 4 = 1.5 GB/s.
    assert bandwidths("allreduce", 10**9, 1.0, 4) == pytest.approx((1.0, 1.5))
    assert bandwidths("allreduce", 10**9, 1.0, 2) == pytest.approx((1.0, 1.0))
    assert bandwidths("pingpong", 10**9, 2.0, 2) == pytest.approx((0.5, 0.5))


def test_csv_round_trip_and_bad_files(tmp_path: Path) -> None:
    row = {c: 0 for c in CSV_COLUMNS} | {"operation": "allreduce", "ranks": 2, "nodes": 1, "bytes": 64,
                                         "median_s": 1.5e-6, "label": "x", "dtype": "float32",
                                         "mpi_library": "Open MPI"}
    path = write_csv([row], tmp_path / "sub" / "b.csv")
    back = read_csv(path)
    assert back[0]["median_s"] == pytest.approx(1.5e-6) and back[0]["ranks"] == 2
    assert rows_to_csv([row]).splitlines()[0] == ",".join(CSV_COLUMNS)
    with pytest.raises(ValueError, match="does not exist"):
        read_csv(tmp_path / "none.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        read_csv(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text(path.read_text().replace("allreduce", "alltoall"))
    with pytest.raises(ValueError, match="unknown operation"):
        read_csv(tmp_path / "bad2.csv")


def _check_rows(rows: list[dict], ranks: int, nodes: int) -> None:
    operations = {r["operation"] for r in rows}
    assert operations == ({"allreduce", "pingpong", "reduce_local"} if ranks > 1 else {"allreduce", "reduce_local"})
    sizes = message_sizes(4, 64 << 10, 4)
    for op in operations:
        assert [r["bytes"] for r in rows if r["operation"] == op] == sizes
    for r in rows:
        assert r["ranks"] == ranks and r["nodes"] == nodes
        assert r["repetitions"] >= 3 and r["iterations_per_rep"] >= 1
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["ci95_low_s"] <= r["mean_s"] <= r["ci95_high_s"]
        assert r["algbw_gbytes_per_s"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9, rel=1e-6)
        factor = 2 * (ranks - 1) / ranks if r["operation"] == "allreduce" else 1.0
        assert r["busbw_gbytes_per_s"] == pytest.approx(r["algbw_gbytes_per_s"] * factor, rel=1e-6)
        assert r["mpi_library"].startswith("Open MPI")


def test_self_launched_two_ranks_write_the_csv(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-comm", "--ranks", "2", *QUICK,
                           "--label", "shm", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=local_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching:" in proc.stdout and "mpirun" in proc.stdout
    rows = read_csv(out)
    _check_rows(rows, ranks=2, nodes=1)
    assert {r["label"] for r in rows} == {"shm"} and {r["device"] for r in rows} == {"cpu"}
    assert "busbw GB/s" in proc.stdout


def test_under_mpirun_three_ranks_and_one_rank_without_launcher(tmp_path: Path) -> None:
    out = tmp_path / "three.csv"
    argv = rank_command(3, [sys.executable, "-m", "larscale", "bench-comm", *QUICK, "--out", str(out)])
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=local_env(threads_per_rank=1),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_rows(read_csv(out), ranks=3, nodes=1)
    # Only rank 0 writes and prints: one table header, not three.
    assert proc.stdout.count("median us") == 1

    single = tmp_path / "one.csv"
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-comm", *QUICK, "--out", str(single)],
                          capture_output=True, text=True, cwd=REPO, env=local_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_rows(read_csv(single), ranks=1, nodes=1)


def test_bad_options_are_one_line_usage_errors(tmp_path: Path) -> None:
    cases = [(["--max-bytes", "1K", "--min-bytes", "4K"], "min_bytes"),
             (["--operations", "alltoall"], "alltoall"),
             (["--max-bytes", "lots"], "lots"),
             (["--ranks", "0"], "--ranks")]
    for extra, culprit in cases:
        proc = subprocess.run([sys.executable, "-m", "larscale", "bench-comm", *extra], capture_output=True,
                              text=True, cwd=REPO, env=local_env(), timeout=120)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert culprit in proc.stderr and "Traceback" not in proc.stderr
    # Under a launcher, --ranks must match what the launcher started.
    argv = rank_command(2, [sys.executable, "-m", "larscale", "bench-comm", "--ranks", "3", *QUICK])
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=local_env(), timeout=120)
    assert proc.returncode != 0 and "--ranks 3 but the launcher started 2" in proc.stderr


def test_bench_hvd_times_horovods_allreduce_with_the_mpi_rows(tmp_path: Path) -> None:
    """`larscale bench-hvd`: real Horovod (MPI controller) on 2 ranks, bench-comm's harness and CSV format."""
    out = tmp_path / "hvd.csv"
    env = local_env()
    env.update(HOROVOD_CYCLE_TIME="1", HOROVOD_FUSION_THRESHOLD=str(64 << 20))
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-hvd", "--ranks", "2", *QUICK, "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out)
    assert {r["operation"] for r in rows} == {"horovod_allreduce", "horovod_allreduce_fused", "reduce_local",
                                              "pingpong"}
    sizes = message_sizes(4, 64 << 10, 4)
    hvd_rows = [r for r in rows if r["operation"] == "horovod_allreduce"]
    assert [r["bytes"] for r in hvd_rows] == sizes
    # The fused operation splits n bytes into 16 float32 tensors: sizes below 64 B are left out.
    fused_rows = [r for r in rows if r["operation"] == "horovod_allreduce_fused"]
    assert [r["bytes"] for r in fused_rows] == [n for n in sizes if n >= 16 * 4]
    for r in hvd_rows + fused_rows:
        assert r["ranks"] == 2 and r["nodes"] == 1 and r["repetitions"] >= 3
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["busbw_gbytes_per_s"] == pytest.approx(r["algbw_gbytes_per_s"], rel=1e-6)   # 2(p-1)/p = 1
        assert r["mpi_library"].startswith("Horovod 0.28.1 (mpi controller")
        assert "HOROVOD_CYCLE_TIME=1" in r["mpi_library"]
    assert {r["device"] for r in rows} == {"cpu"}      # --device cpu: Horovod's tensors and the MPI rows on the host
    # A call waits for the background thread's next cycle: even 4 bytes take a good part of the 1 ms cycle.
    assert hvd_rows[0]["mean_s"] > 1e-4


def test_bench_comm_sends_horovod_operations_to_bench_hvd() -> None:
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-comm", *QUICK, "--operations",
                           "horovod_allreduce"], capture_output=True, text=True, cwd=REPO, env=local_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "horovod_allreduce" in proc.stderr and "bench-hvd" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_comm_device_cuda_without_a_gpu_is_one_line() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: benchmarks/gpu_check.sh runs bench-comm --device cuda there")
    proc = subprocess.run([sys.executable, "-m", "larscale", "bench-comm", "--device", "cuda", "--ranks", "2"],
                          capture_output=True, text=True, cwd=REPO, env=local_env(), timeout=120)
    assert proc.returncode == 2 and "--device cuda: this PyTorch" in proc.stderr and "sees no GPU" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "launching" not in proc.stdout


def test_gpu_awareness_is_asked_of_the_mpi_library() -> None:
    """The real Open MPI here answers MPIX_Query_cuda_support() = 0: device pointers never reach it."""
    pytest.importorskip("torch")
    from scaling.benchcomm import gpu_support_verdict

    script = ("from mpi4py import MPI\n"
              "from scaling.benchcomm import device_factories, mpi_gpu_support\n"
              "from larscale import UsageError\n"
              "print(mpi_gpu_support('cuda'))\n"
              "try:\n    device_factories(MPI.COMM_WORLD, 'cuda')\n"
              "except UsageError as err:\n    print('refused:', err)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=local_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer, refusal = proc.stdout.strip().splitlines()
    if "Open MPI" in refusal and "not GPU-aware" in refusal:
        assert answer == "(False, 'MPIX_Query_cuda_support() = 0')"
        assert "MPIX_Query_cuda_support() = 0" in refusal and "bench-hvd --device cuda" in refusal
    else:
        pytest.skip(f"this machine's MPI is not the host-only Open MPI this test expects: {answer}")
    # Libraries without the query are judged by their documented switches; silence is not a yes.
    assert gpu_support_verdict("cuda", ("MPIX_Query_cuda_support", 1), {}) == (True, "MPIX_Query_cuda_support() = 1")
    assert gpu_support_verdict("cuda", None, {"MPICH_GPU_SUPPORT_ENABLED": "1"})[0] is True
    assert gpu_support_verdict("cuda", None, {"MPICH_GPU_SUPPORT_ENABLED": "0"})[0] is False
    assert gpu_support_verdict("rocm", None, {"MV2_USE_CUDA": "1"})[0] is None
    unknown, reason = gpu_support_verdict("cuda", None, {})
    assert unknown is None and "MPIX_Query_cuda_support" in reason and "MPICH_GPU_SUPPORT_ENABLED" in reason


def test_tensor_buffers_through_mpi_on_two_ranks(tmp_path: Path) -> None:
    """The device path's operations on torch tensors (CPU tensors here, handed to mpi4py by DLPack), 2 real ranks."""
    pytest.importorskip("torch")
    out = tmp_path / "tensors.csv"
    script = ("import torch\nfrom mpi4py import MPI\n"
              "from larscale.benchformat import write_csv\n"
              "from scaling.benchcomm import BenchConfig, run_benchmark, tensor_factories\n"
              "config = BenchConfig(max_bytes=64 << 10, factor=4, warmup=2, repetitions=4, min_rep_s=2e-4,\n"
              "                     max_seconds_per_size=2)\n"
              "rows = run_benchmark(MPI.COMM_WORLD, config, tensor_factories(MPI.COMM_WORLD, torch.device('cpu')),\n"
              "                     device='cpu-tensor')\n"
              f"if rows: write_csv(rows, {str(out)!r})\n")
    argv = rank_command(2, [sys.executable, "-c", script])
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=local_env(threads_per_rank=1),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(out)
    _check_rows(rows, ranks=2, nodes=1)
    assert {r["device"] for r in rows} == {"cpu-tensor"}


def test_csv_device_column(tmp_path: Path) -> None:
    """Rows say where their buffers lived; CSVs written before the column existed still read."""
    row = {c: 0 for c in CSV_COLUMNS} | {"operation": "allreduce", "ranks": 2, "nodes": 1, "bytes": 64,
                                         "median_s": 1.5e-6, "label": "", "dtype": "float32", "mpi_library": "x"}
    header, line = rows_to_csv([row | {"device": "cuda"}]).splitlines()
    assert header.endswith(",device") and line.endswith(",cuda")
    assert read_csv(write_csv([row | {"device": "cuda"}], tmp_path / "new.csv"))[0]["device"] == "cuda"
    del row["device"]
    header, line = rows_to_csv([row]).splitlines()
    assert line.endswith(",x,")     # a row without a device (an import) leaves the column empty
    (tmp_path / "old.csv").write_text(f"{header.removesuffix(',device')}\n{line.removesuffix(',')}\n")
    old = read_csv(tmp_path / "old.csv")
    assert "device" not in old[0] and old[0]["mpi_library"] == "x"
