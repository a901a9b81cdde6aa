"""Property-based tests of jobs/: spec loading never crashes, errors name the field, and hostile strings in
names, paths and values never reach a shell unquoted (checked by running the generated scripts with bash)."""

from __future__ import annotations

import copy
import os
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.scripts import render
from jobs.spec import parse_spec
from jobs.sweep import job_groups, plan
from larscale.machine import load_machine
from larscale.schema import SchemaError
from tests.test_jobs import base_spec

# ------------------------------------------------------------------------------------------------ spec fuzz

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)


def _paths(data, prefix=()):
    """Every key path of a nested mapping (to mutate one)."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out.append((*prefix, i))
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def mutated_specs(draw):
    spec = copy.deepcopy(base_spec())
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(spec)
        path = draw(st.sampled_from(paths))
        parent = spec
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            parent[path[-1]] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return spec


@settings(max_examples=600, deadline=None)
@given(mutated_specs())
def test_any_mutated_spec_loads_or_fails_with_a_field_error(spec: dict) -> None:
    try:
        parsed = parse_spec(spec)
    except SchemaError as err:
        assert err.reason and "\n" not in str(err), str(err)
        return
    # A spec that loads either plans or fails with a field error too (machine, divisibility), never a crash.
    try:
        the_plan = plan(parsed, output_dir="/tmp/never-written")
    except SchemaError as err:
        assert err.path and err.reason
        return
    for group in job_groups(the_plan):
        render(the_plan, group)


@settings(max_examples=250, deadline=None)
@given(st.lists(st.integers(1, 512), min_size=1, max_size=6, unique=True), st.data())
def test_a_bad_node_count_is_reported_at_its_index(nodes: list[int], data) -> None:
    index = data.draw(st.integers(0, len(nodes)))
    bad = data.draw(st.sampled_from([0, -1, -7, 1.5, "4", None, True, [2]]))
    nodes = [*nodes[:index], bad, *nodes[index:]]
    with pytest.raises(SchemaError) as info:
        parse_spec(base_spec(sweep={"nodes": nodes}))
    assert info.value.path == f"sweep.nodes[{index}]", str(info.value)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["strong", "weak"]), st.integers(1, 64), st.integers(1, 8), st.integers(1, 4096))
def test_batches_are_divisible_or_rejected(kind: str, nodes: int, ranks_per_node: int, batch: int) -> None:
    sweep = {"kind": kind, "nodes": [nodes], "ranks_per_node": ranks_per_node, "threads_per_rank": 1,
             "global_batch": batch if kind == "strong" else None,
             "batch_per_rank": batch if kind == "weak" else None}
    spec = base_spec(sweep=sweep)
    spec["sweep"] = {k: v for k, v in spec["sweep"].items() if v is not None}
    ranks = nodes * ranks_per_node
    try:
        (point,) = plan(spec, output_dir="/x").points
    except SchemaError as err:
        assert kind == "strong" and batch % ranks and err.path == "sweep.global_batch"
        return
    assert point.batch_per_rank * point.ranks == point.global_batch
    assert point.global_batch == (batch if kind == "strong" else batch * ranks)


# ------------------------------------------------------------------------------------------------ shell safety

PAYLOADS = ["$(touch {canary})", "`touch {canary}`", "'; touch {canary}; '", '"; touch {canary}; "',
            "\ntouch {canary}\n", "$((1+1))", "${{IFS}}", "*", "~", "a b", "\\", "--resume", "-", "!!", "#",
            "&& touch {canary}", "| tee {canary}", "> {canary}", "\t", "%j", "{{a,b}}"]
FAKE_TOOL = ('#!/bin/bash\nprintf "%s\\0" "$@" > "$LARSCALE_ARGV_LOG"\n'
             'printf "%s" "$LARSCALE_HOSTILE" > "$LARSCALE_ARGV_LOG.env"\n')
COMBOS = [(s, l, f) for s in ("slurm", "pbs", "lsf", "local")
          for l, f in (("srun", "openmpi"), ("mpirun", "openmpi"), ("mpirun", "intelmpi"), ("ibrun", "openmpi"),
                       ("horovodrun", "openmpi"), ("jsrun", "openmpi"))]


@st.composite
def hostile(draw, canary: str = "CANARY") -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(PAYLOADS),
                                    st.text(alphabet="ab'\"$`;()|&<>\\\n *?[]{}~#!%", max_size=6)),
                          min_size=1, max_size=4))
    return "".join(parts).replace("{canary}", canary).replace("{{", "{").replace("}}", "}") or "x"


@pytest.fixture(scope="module")
def shell_box():
    with tempfile.TemporaryDirectory() as root:
        root_path = Path(root)
        bin_dir = root_path / "bin"
        bin_dir.mkdir()
        for tool in ("srun", "mpirun", "ibrun", "horovodrun", "jsrun", "mpiexec", "flux"):
            (bin_dir / tool).write_text(FAKE_TOOL)
            (bin_dir / tool).chmod(0o755)
        (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
        (bin_dir / "scontrol").chmod(0o755)
        (root_path / "nodefile").write_text("node1\nnode1\n")
        yield root_path, bin_dir


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COMBOS), st.data())
def test_hostile_values_never_reach_a_shell_unquoted(shell_box, combo, data) -> None:
    root, bin_dir = shell_box
    scheduler, launcher, flavor = combo
    with tempfile.TemporaryDirectory(dir=root) as work:
        work_path = Path(work)
        canary = work_path / "canary"
        values = {k: data.draw(hostile(str(canary)), label=k) for k in ("dataset", "out", "python", "arg", "env")}
        out_name = values["out"].replace("/", "_")[:200] or "x"
        out_dir = work_path / ("o" + out_name)
        out_dir.mkdir()
        machine = replace(load_machine("stampede2-knl"), scheduler=scheduler, launcher=launcher, mpi_flavor=flavor,
                          env=[], launcher_flags=["--flag=" + values["arg"]])
        spec = base_spec(dataset="imagenet:" + values["dataset"],
                         training={"extra_args": [values["arg"], "--x"]},
                         job={"env": {"LARSCALE_HOSTILE": values["env"]}})
        the_plan = plan(spec, machine=machine, output_dir=out_dir, python=values["python"])
        group = job_groups(the_plan)[0]
        script = work_path / "job.sh"
        script.write_text(render(the_plan, group, resume={group.points[0].point_id}))
        log = work_path / "argv"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LARSCALE_ARGV_LOG": str(log), "SLURM_JOB_NODELIST": "node1",
               "PBS_NODEFILE": str(root / "nodefile"), "LSB_HOSTS": "node1 node1", "HOME": str(work_path)}
        proc = subprocess.run(["bash", str(script)], cwd=work_path, env=env, capture_output=True, text=True,
                              timeout=30)
        assert not canary.exists(), f"hostile value was executed:\n{script.read_text()}"
        assert proc.returncode == 0, proc.stderr
        argv = log.read_bytes().decode().split("\0")[:-1]
        expected = the_plan.train_argv(group.points[0], resume=True)
        assert argv[-len(expected):] == expected
        assert "--flag=" + values["arg"] in argv
        assert Path(f"{log}.env").read_text() == values["env"]
        point = group.points[0].point_id
        assert (out_dir / "status" / f"{point}.exit").read_text() == "0\n"
        assert not [p for p in os.listdir(work_path) if p not in ("job.sh", "argv", "argv.env", out_dir.name)]


# ------------------------------------------------------------------------------------ site lines, containers


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["apptainer", "singularity", "podman-hpc", "pyxis", "shifter"]),
       st.sampled_from(["slurm", "pbs", "lsf"]), st.data())
def test_hostile_site_lines_images_and_binds(shell_box, runtime: str, scheduler: str, data) -> None:
    """A site line, a container image and a bind path from a hostile user: refused with the field named, or
    written where they are inert (a directive line bash reads as a comment) or quoted (one argv word each)."""
    from jobs.scripts import check_launch

    root, bin_dir = shell_box
    with tempfile.TemporaryDirectory(dir=root) as work:
        work_path = Path(work)
        canary = work_path / "canary"
        site = data.draw(st.sampled_from(["", "-", "--x=", "-l "]), label="prefix") + data.draw(
            hostile(str(canary)), label="site")
        image, bind = (data.draw(hostile(str(canary)), label=k) for k in ("image", "bind"))
        out_dir = work_path / "out"
        out_dir.mkdir()
        machine = replace(load_machine("dgx-h100"), scheduler=scheduler, launcher="srun", launcher_flags=[])
        spec = base_spec(job={"site_lines": [site], "container": {"runtime": runtime, "image": image,
                                                                  "binds": [bind]}, "qos": None})
        try:
            the_plan = plan(spec, machine=machine, output_dir=out_dir, python="python3")
            check_launch(the_plan)
            text = render(the_plan, job_groups(the_plan)[0])
        except SchemaError as err:
            assert "\n" not in str(err) and err.path.startswith(("job.site_lines[0]", "job.container")), str(err)
            return
        prefix = {"slurm": "#SBATCH ", "pbs": "#PBS ", "lsf": "#BSUB "}[scheduler]
        # Written whole, once, among the directives (where sbatch/qsub/bsub read them and bash sees a comment). Not
        # "the only line containing it": a site line "--resume" also occurs in the resume command, as it should.
        lines = text.splitlines()
        assert lines.count(prefix + site) == 1, text
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        assert lines.index(prefix + site) < first_command, text
        script = work_path / "job.sh"
        script.write_text(text)
        log = work_path / "argv"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LARSCALE_ARGV_LOG": str(log), "SLURM_JOB_NODELIST": "node1",
               "HOME": str(work_path)}
        proc = subprocess.run(["bash", str(script)], cwd=work_path, env=env, capture_output=True, text=True,
                              timeout=30)
        assert not canary.exists(), f"hostile value was executed:\n{text}"
        assert proc.returncode == 0, proc.stderr
        argv = log.read_bytes().decode().split("\0")[:-1]
        if runtime in ("apptainer", "singularity", "podman-hpc"):
            assert image in argv
        if runtime == "pyxis":
            assert f"--container-image={image}" in argv
        if runtime == "shifter":
            assert f"#SBATCH --image={image}" in text.splitlines()
