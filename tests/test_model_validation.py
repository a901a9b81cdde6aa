"""The public validation set at scale: every row sourced and predicted; the held-out targets."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import yaml

from analysis.validation import (
    VALIDATION_SET,
    FitAxis,
    cross_validate,
    grid_errors,
    held_out_by_origin,
    held_out_by_precision,
    load_set,
    node_step_lines,
    node_steps,
    sign_test_p,
    summary,
    unscored_lines,
    validate_rows,
)


@pytest.fixture(scope="module")
def rows():
    return validate_rows()


def test_every_row_has_its_source_cluster_and_split() -> None:
    doc = load_set()
    assert {r["split"] for r in doc["rows"]} == {"fit", "held_out"}
    for row in doc["rows"]:
        assert doc["sources"][row["source"]].strip()
        cluster = doc["clusters"][row["cluster"]]
        assert cluster["nics_per_node"] >= 1 and cluster["nic_gbps"] > 0
    held_multi = [r for r in doc["rows"] if r["split"] == "held_out" and r["nodes"] > 1]
    assert len(held_multi) >= 10


def test_one_gpu_rows_reproduce_the_published_rate_exactly(tmp_path) -> None:
    doc = load_set()
    row = dict(doc["rows"][0], id="one", gpus=1, nodes=1, published=doc["rows"][0]["one_gpu"])
    doc["rows"] = [row]
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(doc))
    (only,) = validate_rows(path)
    assert only.error == pytest.approx(0.0, abs=1e-9)        # no communication: the compute is the published one


def test_a_source_that_disowns_its_figures_is_printed_but_not_scored(rows, tmp_path) -> None:
    doc = load_set()
    # Of the set's sources only DLPerf's Paddle AMP table with DALI says so (analysis/README.md); its 16 GPUs ran
    # slower than its 8, which no communication cost of the cluster's links explains.
    assert set(doc["not_scored"]) == {"dlperf_paddle_dali"}
    unscored = [r for r in rows if not r.scored]
    assert {r.id for r in unscored} == {"pd-dali196-8", "pd-dali196-16", "pd-dali196-32"}
    assert all(r.error > 0.9 for r in unscored if r.multi_node)
    parts = summary(rows)
    assert sum(p.points for p in parts.values()) == len(rows) - len(unscored)
    (line,) = unscored_lines(rows)
    assert "pd-dali196-16 +92.5%" in line and "not optimal" in line
    out = subprocess.run([sys.executable, "-m", "larscale", "validate"], capture_output=True, text=True,
                         check=True).stdout
    assert "| pd-dali196-16 |" in out and line in out
    # Scored again once the source's note is gone: it is the note, not the error, that leaves a row out.
    del doc["not_scored"]
    path = tmp_path / "scored.yaml"
    path.write_text(yaml.safe_dump(doc))
    again = validate_rows(path)
    assert all(r.scored for r in again) and summary(again)["held_out"].max_abs_error_multi_node > 0.9


def test_a_set_with_no_scored_row_cannot_be_fitted(tmp_path) -> None:
    doc = load_set()
    doc["rows"] = [r for r in doc["rows"] if r["source"] == "dlperf_paddle_dali"]
    path = tmp_path / "unscored.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "larscale", "validate", "--set", str(path), "--cross-validate"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no scored row" in proc.stderr and "Traceback" not in proc.stderr


def test_sign_test() -> None:
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32) and sign_test_p(9, 1) == pytest.approx(22 / 1024)
    assert sign_test_p(22, 28) == sign_test_p(28, 22) > 0.4


@pytest.mark.parametrize("bad, culprit", [({"framework": "carrier-pigeon"}, "carrier-pigeon"),
                                          ({"added_by": " "}, "added_by must name the rule")])
def test_bad_rows_are_named(tmp_path, bad: dict, culprit: str) -> None:
    doc = load_set()
    doc["rows"] = [dict(doc["rows"][0], **bad)]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=culprit):
        validate_rows(path)


def test_the_hosts_spread_is_the_fitted_one_and_a_bad_one_is_named(tmp_path) -> None:
    doc = load_set()
    assert doc["host_step_jitter_us_per_image"] == 80        # analysis/README.md: validation.fit()'s point
    doc["host_step_jitter_us_per_image"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="host_step_jitter_us_per_image"):
        validate_rows(path)


@pytest.mark.parametrize("not_scored", [{"no_such_source": "its note"}, {"dlperf": " "}, ["dlperf"]])
def test_a_bad_not_scored_entry_is_named(tmp_path, not_scored) -> None:
    doc = dict(load_set(), not_scored=not_scored)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="not_scored"):
        validate_rows(path)


def test_summary_counts_sign_and_size_of_multi_node_errors(rows) -> None:
    parts = summary(rows)
    for split, part in parts.items():
        multi = [r.error for r in rows if r.split == split and r.multi_node and r.scored]
        assert part.over + part.under == len(multi)
        assert part.median_error_multi_node == pytest.approx(statistics.median(multi))


def test_cli_prints_every_row_and_both_summaries() -> None:
    out = subprocess.run([sys.executable, "-m", "larscale", "validate"], capture_output=True, text=True, check=True)
    doc = yaml.safe_load(VALIDATION_SET.read_text())
    for row in doc["rows"]:
        assert f"| {row['id']} |" in out.stdout
    assert "fit: " in out.stdout and "held_out: " in out.stdout


def test_held_out_targets_at_scale(rows) -> None:
    # At the constants in the files (fitted on every scored row: the leave-one-table-out test below is the judge),
    # the held-out part, the rows the targets were first met on, and the rows a later rule added: every
    # multi-node point within 25 %, the median within 10 %, no sign bias a sign test can see.
    held = summary(rows)["held_out"]
    for part in (held, *held_out_by_origin(rows)):
        assert part.multi_node_points >= 10, part
        assert part.max_abs_error_multi_node <= 0.25, part
        assert abs(part.median_error_multi_node) <= 0.10, part
        assert part.sign_test_p == sign_test_p(part.over, part.under) > 0.05, part


# A coarse grid through the adopted point and the one before it (the full grid: `larscale validate
# --cross-validate`, about a minute).
COARSE_GRID = (FitAxis("interference", (0.05, 0.2)), FitAxis("step_jitter_us_per_image", (80.0,)),
               FitAxis("inter_efficiency", (0.96, 0.15), cluster="dlperf-v100"))


@pytest.fixture(scope="module")
def coarse():
    return grid_errors(grid=COARSE_GRID)


def test_the_constants_in_the_files_are_the_fits_choice(coarse) -> None:
    from analysis.devices import collectives

    doc = load_set()
    chosen, _ = coarse.fit()
    assert chosen["interference"] == collectives("gpu").interference
    assert chosen["step_jitter_us_per_image"] == doc["host_step_jitter_us_per_image"]
    assert chosen["dlperf-v100.inter_efficiency"] == doc["clusters"]["dlperf-v100"]["inter_efficiency"]
    # The first 13 fit rows alone point the same way: TF1's rows of unstated transport against NVIDIA PyTorch's,
    # whose source states IB verbs (analysis/README.md).
    fit_rows = [i for i, r in enumerate(coarse.rows) if r.split == "fit"]
    on_fit_rows, loss = coarse.fit(("fit",))
    assert on_fit_rows == coarse.named(coarse.best(fit_rows)) and loss == coarse.loss(coarse.best(fit_rows), fit_rows)
    assert on_fit_rows["dlperf-v100.inter_efficiency"] < 0.96


def test_a_row_whose_source_states_verbs_takes_the_verbs_rate(tmp_path) -> None:
    doc = load_set()
    verbs = next(r for r in doc["rows"] if r.get("transport") == "verbs" and r["nodes"] > 1)
    unstated = dict(verbs, id="unstated")
    del unstated["transport"]
    doc["rows"] = [verbs, unstated]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(doc))
    stated, other = validate_rows(path)
    assert other.predicted < stated.predicted          # the cluster's stated share, 0.15 of the NIC, is slower
    doc["clusters"][verbs["cluster"]]["inter_efficiency"] = 0.96
    path.write_text(yaml.safe_dump(doc))
    assert validate_rows(path)[1].predicted == pytest.approx(stated.predicted)
    doc["rows"] = [dict(verbs, transport="pigeon")]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="transport must be one of"):
        validate_rows(path)


def test_each_table_predicted_from_the_others_meets_the_targets(coarse) -> None:
    crossed = cross_validate(coarse)
    assert len(crossed) == len(coarse.rows)
    multi = [r for r in crossed if r.multi_node and r.scored]
    assert len(multi) >= 40 and max(abs(r.error) for r in multi) <= 0.25
    assert abs(statistics.median(r.error for r in multi)) <= 0.10
    assert sign_test_p(sum(r.error > 0 for r in multi), sum(r.error < 0 for r in multi)) > 0.05
    # The rows of the source that disowns its figures are predicted too, and miss as they do at the fit.
    assert all(r.error > 0.9 for r in crossed if r.multi_node and not r.scored)


def test_rows_added_by_a_rule_are_summarised_apart(rows) -> None:
    held = [r for r in rows if r.split == "held_out" and r.scored]
    before, *added = held_out_by_origin(rows)
    assert before.points + sum(a.points for a in added) == len(held)
    assert before.points == sum(not r.added_by for r in held)
    assert all(r.split == "held_out" for r in rows if r.added_by)        # a later rule adds held-out rows only
    fp32, mixed = held_out_by_precision(rows)
    assert fp32.points + mixed.points == len(held) and fp32.points and mixed.points
    assert fp32.multi_node_points + mixed.multi_node_points == summary(rows)["held_out"].multi_node_points


def test_the_mixed_precision_note_says_what_the_rows_show(rows) -> None:
    # predict and plan warn that mixed precision across nodes runs slower than predicted, because most such
    # points of the set do; a model that explains them must also retire the note (analysis/params.py).
    mixed = [r.error for r in rows if r.nodes > 1 and r.precision != "fp32" and r.scored]
    assert len(mixed) >= 10 and sum(e > 0 for e in mixed) > 1.5 * sum(e < 0 for e in mixed)

    def notes(*argv: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "larscale", "predict", "--model", "resnet50",
                               "--global-batch", "4096", *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    assert "across nodes" in notes("--machine", "dgx-h100", "--nodes", "1", "4", "--precision", "bf16")
    assert "across nodes" not in notes("--machine", "dgx-h100", "--nodes", "4", "--precision", "fp32")
    assert "across nodes" not in notes("--machine", "dgx-h100", "--nodes", "1", "--precision", "bf16")


def test_each_multi_node_row_is_set_against_its_own_series_single_node_row(rows) -> None:
    steps = {s.id: s for s in node_steps(rows)}
    by_id = {r.id: r for r in rows}
    # Two pipelines of one source, precision and batch stay apart (DLPerf's NGC MXNet fp16 with and without AMP).
    assert steps["ngcmx-fp16-16"].single_node_id == "ngcmx-fp16-8"
    assert steps["ngcmx-amp-16"].single_node_id == "ngcmx-amp-8"
    assert "of-b144-16" not in steps                       # its series has no single-node row
    assert all(by_id[s.id].multi_node and by_id[s.single_node_id].nodes == 1 for s in steps.values())
    one, many = by_id["tf2-amp256-8"], by_id["tf2-amp256-16"]
    step = steps["tf2-amp256-16"]
    # The step's growth on leaving the node: per-GPU rates, so the 1-GPU rate cancels.
    assert step.published_ratio == pytest.approx((one.published / 8) / (many.published / 16))
    assert step.predicted_ratio == pytest.approx((one.predicted / 8) / (many.predicted / 16))
    assert step.error == pytest.approx(step.predicted_ratio / step.published_ratio - 1)
    lines = node_step_lines(list(steps.values()))
    assert any(line.startswith("held_out leaving the node, mixed precision") for line in lines)
    out = subprocess.run([sys.executable, "-m", "larscale", "validate", "--split", "fit"], capture_output=True,
                         text=True, check=True).stdout
    assert "| pt-amp-16 | pt-amp-8 | fit |" in out and "held_out leaving the node" not in out


def test_the_documented_scale_spread_is_the_rows_residual(rows) -> None:
    import math

    from analysis.devices import collectives

    # Every row, the unscored ones too: a user's stack may be set up as badly as theirs, and the band should say
    # so (the cross-validation judges the constants, not this spread).
    rms = math.sqrt(statistics.fmean(math.log1p(r.error) ** 2 for r in rows))
    assert collectives("gpu").scale_sigma == pytest.approx(rms, abs=0.005)
    assert sum(r.low <= r.published <= r.high for r in rows) >= 0.85 * len(rows)      # a 90 % band


def test_collective_benchmarks_ring_rows_within_ten_percent() -> None:
    from analysis.validation_collectives import collective_rows

    rows = {r.id: r for r in collective_rows()}
    assert {r.split for r in rows.values()} == {"fit", "held_out"}
    # The efficiencies' own source is reproduced; the held-out rings and multi-node rows within 10 %.
    for key in ("a800-intra", "a800-hdr-12n", "a100-4hdr-2n", "a100-4hdr-3n", "h100-ring-2n", "h100-4n"):
        assert abs(rows[key].error) <= 0.10, key
    # NVLink SHARP (NCCL's NVLS algorithms on NVSwitch, one and two nodes) reduces inside the switch: not
    # modelled, the model stays below it.
    assert rows["h100-1n"].error < -0.15 and rows["h100-2n"].error < -0.15


@pytest.mark.parametrize("text, culprit", [
    ("rows: [\n", "bad.yaml:2: not YAML"),
    ("- 1\n", "needs mappings 'sources' and 'clusters'"),
    ("sources: {}\nclusters: {}\nrows:\n  - {id: x}\n", "rows[0] lacks cluster"),
])
def test_cli_bad_validation_set_is_one_line_exit_2(tmp_path, text: str, culprit: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "larscale", "validate", "--set", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert culprit in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
