"""The command line speaks command line (issue #17): progress within a running point, errors once and by option.

- the step log's tail gives step k of n, images/s and an ETA, also from a log longer than the tail read and
  with a line being written;
- on a terminal the progress is one line rewritten in place, state changes print above it; elsewhere plain
  lines, at most one per point per interval;
- ``sweep submit --wait`` prints the running point's progress (a real local job with a stand-in trainer);
- bad command-line values are one line naming the option; the LR preset's range error names ``--lr``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from jobs.progress import ProgressDisplay, describe_progress, read_progress
from tests.test_jobs import base_spec, run_cli
from tests.test_jobs_retry import stand_in  # noqa: F401 - the fixture, used by name

RECORD = {"epoch": 0, "rank": 0, "ranks": 2, "batch_per_rank": 4, "global_batch": 8, "data_s": 0.0,
          "compute_s": 0.01, "allreduce_s": 0.0, "optimizer_s": 0.0, "images_per_s": 400.0, "lr": 0.1,
          "loss": 1.0, "time": 0.0}


def write_log(run_dir: Path, steps: int, step_s: float, torn: bool = False) -> None:
    (run_dir / "steps").mkdir(parents=True)
    with open(run_dir / "steps" / "rank-00000.jsonl", "w") as fh:
        for step in range(steps):
            fh.write(json.dumps({**RECORD, "step": step, "step_s": step_s}, separators=(",", ":")) + "\n")
        if torn:
            fh.write('{"step":')


def test_progress_from_the_tail_of_a_long_step_log(tmp_path: Path) -> None:
    write_log(tmp_path, steps=5000, step_s=0.02, torn=True)
    progress = read_progress(tmp_path, steps_planned=6000)
    assert progress.steps_done == 5000 and progress.steps_planned == 6000
    assert progress.images_per_s == pytest.approx(8 / 0.02)             # the job's rate: global batch / step
    assert progress.eta_s == pytest.approx(1000 * 0.02)
    assert describe_progress(progress, attempt=2) == "step 5000/6000 (83 %), 400 img/s, ETA 20s, attempt 2"
    epochs = read_progress(tmp_path)                                     # steps unknown: no ETA, no total
    assert describe_progress(epochs) == "step 5000, 400 img/s"
    assert read_progress(tmp_path / "nothing-yet") is None


def test_terminal_gets_one_updating_line_and_state_lines_above_it() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, terminal=True)
    display.update("a", "a: step 1/10")
    display.update("a", "a: step 2/10")
    display.say("a complete")
    text = stream.getvalue()
    assert text.count("\n") == 1 and "\ra: step 1/10" in text and "\ra: step 2/10" in text
    assert text.endswith("a complete\n")
    # After the state line, what is left on the screen is that line: the progress line was wiped first.
    assert text.split("\r")[-1].strip() == "a complete"


def test_plain_lines_when_not_on_a_terminal() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, plain_every_s=3600, terminal=False)
    for step in range(1, 50):
        display.update("a", f"a: step {step}/50")
    display.update("b", "b: step 1/50")
    display.say("a complete")
    assert stream.getvalue().splitlines() == ["a: step 1/50", "b: step 1/50", "a complete"]
    assert "\r" not in stream.getvalue()


def test_sweep_submit_shows_progress_within_a_running_point(tmp_path: Path, stand_in) -> None:  # noqa: F811
    spec = base_spec(machine="local", sweep={"kind": "strong", "nodes": [1], "global_batch": 2,
                                             "ranks_per_node": 1, "threads_per_rank": 1},
                     training={"steps": 400, "checkpoint_every": 100, "image_size": 16, "warmup_steps": 0})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**stand_in, "STANDIN_STEP_S": "0.01"}
    proc = run_cli("sweep", "submit", str(path), "--scheduler", "local", "--wait", "--output",
                   str(tmp_path / "sweep"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "n1-p1-b2: step " in ln]
    assert lines, proc.stdout
    assert all("/400 (" in ln and " img/s, ETA " in ln for ln in lines), lines


@pytest.mark.parametrize(("argv", "words"), [
    (["--points", "n9-p9-b9"], "--points: unknown point id(s) n9-p9-b9"),
    (["--timeout", "-5"], "--timeout must be a number of seconds > 0"),
])
def test_submit_errors_are_one_line_naming_the_option(tmp_path: Path, argv: list[str], words: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec()))
    proc = run_cli("sweep", "submit", str(path), "--dry-run", "--output", str(tmp_path / "out"), *argv)
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_lr_preset_range_error_names_the_option_not_a_python_argument() -> None:
    from scaling.schedules import PresetRangeError, preset

    with pytest.raises(PresetRangeError) as info:
        preset("resnet50", 65536)
    assert "--lr" in str(info.value) and "extrapolate" not in str(info.value)


def test_progress_display_is_importable_without_a_terminal() -> None:
    # The default stream is stdout; under pytest it is not a terminal.
    assert ProgressDisplay().terminal == sys.stdout.isatty()
