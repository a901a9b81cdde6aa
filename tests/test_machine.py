"""Machine profiles: the bundled ones load, bad ones are refused with the field's path, and no input at all
(fuzzed with hypothesis) gets anything but a clear SchemaError."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from larscale.machine import (
    MachineProfile,
    bundled_machines,
    format_walltime,
    load_machine,
    parse_machine,
    walltime_seconds,
)
from larscale.schema import SchemaError

LOCAL = yaml.safe_load((Path(__file__).resolve().parents[1] / "larscale/machines/local.yaml").read_text())


def test_bundled_profiles_load_and_round_trip(tmp_path: Path) -> None:
    names = bundled_machines()
    assert {"local", "stampede2-knl", "stampede2-skx", "gpu-cluster"} <= set(names)
    for name in names:
        profile = load_machine(name)
        assert profile.name == name
        again = tmp_path / f"{name}.yaml"
        again.write_text(profile.to_yaml())
        assert load_machine(str(again)) == profile


def test_seed_machines_match_reference() -> None:
    knl, skx = load_machine("stampede2-knl"), load_machine("stampede2-skx")
    assert knl.node.devices.peak_tflops["fp32"] == pytest.approx(6.1)
    assert knl.node.cores == 68 and skx.node.cores == 48
    for profile in (knl, skx):
        assert profile.network.inter_node.bandwidth_gbps == 100  # Omni-Path 100 Gb/s
        assert profile.network.inter_node.beta_s_per_byte == pytest.approx(1 / 12.5e9)


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda d: d["network"]["inter_node"].update(bandwith_gbps=1), "network.inter_node.bandwith_gbps",
         "did you mean 'bandwidth_gbps'"),
        (lambda d: d["node"].pop("cores"), "node.cores", "required field is missing"),
        # Which schedulers exist is jobs/schedulers/'s registry (checked when a sweep is planned): here, the name.
        (lambda d: d.update(scheduler="SGE 8"), "scheduler", "lowercase"),
        (lambda d: d["node"]["devices"].update(count=0), "node.devices.count", "must be > 0"),
        (lambda d: d["node"]["devices"].update(peak_tflops={"fp16": 1.0}), "node.devices.peak_tflops", "fp32"),
        (lambda d: d["limits"].update(max_walltime="25 hours"), "limits.max_walltime", "HH:MM:SS"),
        (lambda d: d.update(name="My Machine"), "name", "lowercase"),
        (lambda d: d["env"].insert(0, 3), "env[0]", "expected a string"),
        (lambda d: d["network"].update(intra_node="fast"), "network.intra_node", "expected a mapping"),
    ],
)
def test_bad_profiles_name_the_field(mutate, path: str, reason: str) -> None:
    data = copy.deepcopy(LOCAL)
    mutate(data)
    with pytest.raises(SchemaError) as err:
        parse_machine(data, "user.yaml")
    assert err.value.path == path
    assert reason in str(err.value) and str(err.value).startswith("user.yaml: ")


def test_unknown_machine_lists_bundled_ones() -> None:
    with pytest.raises(SchemaError, match="unknown machine 'summit'.*stampede2-knl"):
        load_machine("summit")


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        load_machine(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nnode: [1, 2\n")
    with pytest.raises(SchemaError, match=r"broken.yaml: .*not valid YAML: line \d+"):
        load_machine(str(broken))


def test_walltime_forms() -> None:
    assert walltime_seconds("48:00:00") == 172800
    assert walltime_seconds("1-02:03:04") == 93784
    assert format_walltime(93784) == "26:03:04"
    for bad in ("1:2:3", "00:60:00", "", "12h"):
        with pytest.raises(ValueError, match="walltime"):
            walltime_seconds(bad)


# ---- fuzzing: any document, any mutation of a valid one → a MachineProfile or a SchemaError, nothing else ----
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


def _paths(data, prefix=()):
    if isinstance(data, dict):
        for key, value in data.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


@st.composite
def mutated_profiles(draw):
    data = copy.deepcopy(LOCAL)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(documents)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(documents)
    return data


def _load_or_schema_error(data) -> None:
    try:
        assert isinstance(parse_machine(data, "fuzz.yaml"), MachineProfile)
    except SchemaError as err:
        assert str(err).startswith("fuzz.yaml: ") and err.reason


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_profiles())
def test_fuzz_mutated_profiles(data) -> None:
    _load_or_schema_error(data)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_fuzz_arbitrary_documents(data) -> None:
    _load_or_schema_error(data)


def test_bad_profile_error_is_one_clear_line(tmp_path: Path) -> None:
    """A bad profile file reads as one line naming the file and the field, in a fresh process."""
    data = copy.deepcopy(LOCAL)
    data["node"]["devices"]["count"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    code = ("import sys; from larscale.machine import load_machine; from larscale.schema import SchemaError\n"
            "try:\n    load_machine(sys.argv[1])\nexcept SchemaError as e:\n    print(e); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "node.devices.count: must be > 0" in proc.stdout
