"""Corrupt inputs to analysis and unwritable outputs (issue #9), on real run directories.

A real local sweep (the real trainer, GoogLeNet at 32 px so that calibrate knows its FLOPs, one rank per point,
run by the local scheduler of jobs/) leaves six run directories; five are then damaged the ways real files get
damaged:

- a step log cut in the middle of its last line (a copy or a disk that filled up mid-write),
- a step log cut at a line boundary (three of six steps left: no line is malformed, only the count is wrong),
- a summary without a required field,
- a step log with a non-JSON line in the middle,
- an empty run directory.

``larscale sweep collect`` and ``larscale calibrate --runs`` must name every problem with its file (and line where
there is one), count what they skipped, use only the intact data, and exit non-zero under ``--strict``.

Outputs: ``larscale sweep submit --output``, ``larscale bench-comm --out`` and ``larscale calibrate --out`` on a
read-only mount or under a regular file are refused at start with one line, before any work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from analysis.runs import read_run, read_runs
from jobs.collect import collect
from jobs.submit import submit
from jobs.sweep import plan
from larscale.runformat import read_steps, step_log_path
from scaling.launch import local_env
from tests.conftest import REPO
from tests.test_faults_train import mount_available, mounted

STEPS = 6
BATCHES = (2, 4, 6, 8, 10, 12)


def larscale(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "larscale", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=local_env(threads_per_rank=1))


def spec(name: str = "faults") -> dict:
    return {
        "name": name, "model": "googlenet", "framework": "torch", "dataset": "synthetic", "machine": "local",
        "sweep": {"kind": "grid", "nodes": [1], "ranks_per_node": 1, "global_batches": list(BATCHES),
                  "threads_per_rank": 1},
        "training": {"steps": STEPS, "optimizer": "sgd", "lr": 0.1, "warmup_steps": 0, "image_size": 32,
                     "num_classes": 10, "extra_args": ["--no-eval", "--measure-warmup-steps", "1"]},
        "job": {"walltime": "00:10:00"},
    }


@pytest.fixture(scope="module")
def damaged_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The sweep directory and point id → run directory, after the damage (see the module docstring)."""
    root = tmp_path_factory.mktemp("faults-sweep")
    the_plan = plan(spec(), output_dir=root / "sweep")
    manifest = submit(the_plan, env=local_env(threads_per_rank=1), timeout=240)
    logs = "\n".join(p.read_text()[-1500:] for p in (root / "sweep" / "logs").glob("*.out"))
    assert {r.state for r in manifest.points.values()} == {"complete"}, logs
    runs = {pid: Path(rec.run_dir) for pid, rec in manifest.points.items()}
    assert sorted(runs) == sorted(f"n1-p1-b{b}" for b in BATCHES)
    assert all(len(read_steps(step_log_path(d, 0))) == STEPS for d in runs.values())
    assert not collect(root / "sweep").problems  # intact before the damage

    torn = step_log_path(runs["n1-p1-b2"], 0)
    data = torn.read_bytes()
    torn.write_bytes(data[:-40])                                       # last line cut in the middle
    short = step_log_path(runs["n1-p1-b4"], 0)
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:3]))   # cut at a line boundary
    summary_path = runs["n1-p1-b6"] / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["throughput"]
    summary_path.write_text(json.dumps(summary))
    junk = step_log_path(runs["n1-p1-b8"], 0)
    lines = junk.read_text().splitlines(keepends=True)
    junk.write_text("".join([*lines[:2], "this is not JSON\n", *lines[2:]]))   # line 3
    shutil.rmtree(runs["n1-p1-b10"])
    runs["n1-p1-b10"].mkdir()
    return root / "sweep", runs                                        # n1-p1-b12 stays intact


@pytest.mark.slow
def test_collect_reports_every_damage_with_file_and_line(damaged_sweep) -> None:
    sweep, runs = damaged_sweep
    result = collect(sweep)
    by_point: dict[str, list] = {}
    for problem in result.problems:
        by_point.setdefault(problem.point_id, []).append(problem)
    assert set(by_point) == {"n1-p1-b2", "n1-p1-b4", "n1-p1-b6", "n1-p1-b8", "n1-p1-b10"}, result.problems
    torn_log = str(step_log_path(runs["n1-p1-b2"], 0))
    assert any(p.file == torn_log and p.line == STEPS and p.kind == "malformed" for p in by_point["n1-p1-b2"])
    assert any(p.file == str(step_log_path(runs["n1-p1-b4"], 0)) and "3 valid step record(s)" in p.reason
               and f"says {STEPS} step(s) done" in p.reason for p in by_point["n1-p1-b4"])
    assert [(p.file, p.reason) for p in by_point["n1-p1-b6"]] == [
        (str(runs["n1-p1-b6"] / "summary.json"), "summary lacks throughput")]
    assert any(p.file == str(step_log_path(runs["n1-p1-b8"], 0)) and p.line == 3 for p in by_point["n1-p1-b8"])
    assert [p.file for p in by_point["n1-p1-b10"]] == [str(runs["n1-p1-b10"] / "summary.json")]
    assert "missing" in by_point["n1-p1-b10"][0].reason

    table = result.table.set_index("point_id")
    assert len(table) == len(BATCHES)                      # one row per point, damaged ones included
    # Only intact records enter the table: the junk line is skipped, its run keeps its 6 steps.
    assert table.loc["n1-p1-b8", "step_records"] == STEPS and table.loc["n1-p1-b2", "step_records"] == STEPS - 1
    assert table.loc["n1-p1-b12", "step_records"] == STEPS and table.loc["n1-p1-b12", "images_per_s"] > 0

    strict = larscale("sweep", "collect", str(sweep), "--strict")
    assert strict.returncode == 1 and "Traceback" not in strict.stderr, strict.stderr
    assert f"{len(result.problems)} problem(s), {result.malformed} malformed record(s)" in strict.stderr
    for where in (f"{torn_log}:{STEPS}]", f"{step_log_path(runs['n1-p1-b8'], 0)}:3]",
                  f"{runs['n1-p1-b6'] / 'summary.json'}]", f"{step_log_path(runs['n1-p1-b4'], 0)}]",
                  f"{runs['n1-p1-b10'] / 'summary.json'}]"):
        assert where in strict.stderr, (where, strict.stderr)
    relaxed = larscale("sweep", "collect", str(sweep))
    assert relaxed.returncode == 0 and f"{len(result.problems)} problem(s)" in relaxed.stderr


@pytest.mark.slow
def test_calibrate_skips_and_counts_and_fails_with_strict(damaged_sweep, tmp_path: Path) -> None:
    _, runs = damaged_sweep
    dirs = [str(runs[f"n1-p1-b{b}"]) for b in BATCHES]
    measured, skipped = read_runs(dirs)
    # Skipped lines: the torn last line and the junk line; skipped runs: the summary without throughput (it
    # fails validation) and the empty directory; incomplete logs: the torn one and the one cut at a line boundary.
    described = [str(p) for p in skipped]
    assert f"{step_log_path(runs['n1-p1-b2'], 0)}:{STEPS}: not JSON" in described[0]
    assert any(s.startswith(f"{step_log_path(runs['n1-p1-b8'], 0)}:3: not JSON") for s in described)
    assert any(s.startswith(f"{runs['n1-p1-b6']}") and "summary lacks throughput" in s and "run skipped" in s
               for s in described)
    assert any(s.startswith(f"{runs['n1-p1-b10']}:") and "no summary.json" in s for s in described)
    assert any(s.startswith(f"{step_log_path(runs['n1-p1-b4'], 0)}: 3 valid step record(s)") for s in described)
    assert sorted(p.what for p in skipped) == ["line skipped"] * 2 + ["run skipped"] * 2 + ["steps missing"] * 2
    assert sorted(m.batch_per_rank for m in measured) == [2, 4, 8, 12]
    # The skipped junk line did not shift the steps: the damaged run reads like its intact self would.
    junk = next(m for m in measured if m.batch_per_rank == 8)
    assert junk.steps_measured == STEPS - 1                        # 1 warm-up step excluded
    assert junk.step_s == read_run(runs["n1-p1-b8"], problems=[]).step_s
    with pytest.raises(ValueError, match=r"rank-00000.jsonl:3: not JSON"):
        read_run(runs["n1-p1-b8"])                                  # without a problems list: an error

    out = tmp_path / "cal.yaml"
    proc = larscale("calibrate", "--machine", "local", "--runs", *dirs, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped 2 step-log line(s) and 2 run(s) of {len(BATCHES)}; 2 step log(s) incomplete" in proc.stderr
    for text in described:
        assert text in proc.stderr
    profile = yaml.safe_load(out.read_text())
    (table,) = [t for key, t in profile["compute"]["measured_images_per_s"].items() if key.startswith("googlenet")]
    assert sorted(table) == [2, 4, 8, 12]
    assert profile["calibration"]["inputs"]["skipped"] == described

    strict_out = tmp_path / "strict.yaml"
    strict = larscale("calibrate", "--machine", "local", "--runs", *dirs, "--out", str(strict_out), "--strict")
    assert strict.returncode == 1 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
    assert "--strict: no profile written" in strict.stderr and not strict_out.exists()
    for text in described:
        assert text in strict.stderr
    # Only broken runs: nothing to fit, one clear usage error.
    none = larscale("calibrate", "--machine", "local", "--runs", str(runs["n1-p1-b10"]), "--out", str(out))
    assert none.returncode == 2 and "none of the 1 run(s)" in none.stderr and "Traceback" not in none.stderr


# ------------------------------------------------------------------------------------------------ outputs


@pytest.fixture
def unwritable(tmp_path: Path, request) -> Iterator[Path]:
    """A directory where nothing can be written: a read-only bind mount (root ignores permission bits), or a
    path under a regular file."""
    if request.param == "under-a-file":
        (tmp_path / "file").write_text("x\n")
        yield tmp_path / "file"
        return
    if not mount_available():
        pytest.skip("needs root to mount")
    target = tmp_path / "ro"
    target.mkdir()
    with mounted(target, ["--bind", str(target)], ["-o", "remount,bind,ro"]):
        yield target


OUTPUT_CASES = pytest.mark.parametrize("unwritable", ["read-only-mount", "under-a-file"], indirect=True)


def one_line_refusal(proc: subprocess.CompletedProcess, culprit: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and culprit in proc.stderr, proc.stderr[-2000:]
    assert "cannot write there" in proc.stderr or "Not a directory" in proc.stderr, proc.stderr[-2000:]


@OUTPUT_CASES
def test_sweep_submit_refuses_an_unwritable_output(unwritable: Path, tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec("unwritable")))
    out = unwritable / "sweep"
    proc = larscale("sweep", "submit", str(spec_path), "--scheduler", "local", "--output", str(out))
    one_line_refusal(proc, str(out))
    assert "--output" in proc.stderr and "n1-p1-b2" not in proc.stdout      # refused before planning output


@OUTPUT_CASES
def test_bench_comm_refuses_an_unwritable_out_before_measuring(unwritable: Path) -> None:
    out = unwritable / "comm.csv"
    proc = larscale("bench-comm", "--max-bytes", "64", "--repetitions", "3", "--out", str(out))
    one_line_refusal(proc, str(out.parent))
    assert "allreduce" not in proc.stdout                             # nothing was measured


@OUTPUT_CASES
def test_calibrate_refuses_an_unwritable_out_before_fitting(unwritable: Path, tmp_path: Path) -> None:
    from larscale.benchformat import CSV_COLUMNS, write_csv

    rows = [{c: 0 for c in CSV_COLUMNS} | {"operation": "allreduce", "ranks": 2, "nodes": 1, "bytes": 4 ** k,
                                           "median_s": 1e-5 + 1e-9 * 4 ** k, "label": "", "dtype": "float32",
                                           "mpi_library": "none"} for k in range(1, 8)]
    csv_path = write_csv(rows, tmp_path / "bench.csv")
    out = unwritable / "cal.yaml"
    proc = larscale("calibrate", "--machine", "local", "--bench", str(csv_path), "--out", str(out))
    one_line_refusal(proc, str(out.parent))
    assert "rms relative residual" not in proc.stdout
