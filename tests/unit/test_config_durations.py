"""Durations (resources.time, targets.slurm.time): parsed once in config into a timedelta that
every backend renders its own way; anything else is a one-line error naming the field (issue 12 item 7)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from torchcapsule.config import duration_text, parse_duration, parse_project
from torchcapsule.errors import ConfigError

from ..conftest import run_capsule

H, M, S = timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1)


@pytest.mark.parametrize("value,expected", [
    (90, 90 * M), ("90", 90 * M), ("1:30", 90 * S), ("90:30", 90 * M + 30 * S),  # Slurm: M, M:S
    ("02:00:00", 2 * H), ("36:00:00", 36 * H), ("1-12", 36 * H), ("1-12:30", 36 * H + 30 * M),
    ("1-12:30:15", 36 * H + 30 * M + 15 * S), ("0-00:01", M),  # D-H, D-H:M, D-H:M:S
    ("2h", 2 * H), ("90m", 90 * M), ("30s", 30 * S), ("1d", 24 * H), ("1h30m", 90 * M), ("1D12H", 36 * H),
])
def test_duration_forms(value, expected):
    assert parse_duration(value) == expected


@pytest.mark.parametrize("limit,text", [(2 * H, "02:00:00"), (90 * S, "00:01:30"), (36 * H + 5 * S, "1-12:00:05")])
def test_duration_text_is_slurms_form_and_reads_back(limit, text):
    assert duration_text(limit) == text and parse_duration(text) == limit


@pytest.mark.parametrize("value,needle", [
    ("abc", "'abc' is not a duration"), ("0", "is no time"), ("0h", "is no time"), ("-5", "not a duration"),
    ("1.5", "not a duration"), ("true", "not a duration"), ("'2h 30m'", "not a duration"),
    ("'1:75'", "run 0-59"), ("1-24", "hours after 'D-' 0-23"), ("400d", "over a year"),
    ("99999999999999999999", "not a duration"),
])
@pytest.mark.parametrize("where", ["stages.t.resources.time", "targets.slurm.time"])
def test_bad_durations_are_one_line_errors_naming_the_field(value, needle, where):
    text = ("name: x\nstages:\n  t:\n    run: a\n    resources: {time: %s}\n" if where.startswith("stages")
            else "name: x\ntargets:\n  slurm: {time: %s}\n") % value
    with pytest.raises(ConfigError) as info:
        parse_project(text, "f.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"f.yaml:{5 if where.startswith('stages') else 3}: {where}: ")
    assert needle in msg and ("90m, 2h" in msg or "leave the key out" in msg)


def test_unquoted_clock_times_are_durations_not_base_60_numbers():
    """YAML 1.1 reads 12:00:00 as the integer 43200 (which would be 30 days of minutes) and 1:30 as
    90; capsule.yaml reads them as written, in every field."""
    p = parse_project("name: x\nstages:\n  t:\n    run: a\n    env: {AT: 1:30}\n"
                      "    resources: {time: 12:00:00}\n  u: {run: b, resources: {time: 1:30}}\n", "f.yaml")
    assert p.stages["t"].resources.time == 12 * H and p.stages["u"].resources.time == 90 * S
    assert p.stages["t"].env == {"AT": "1:30"}
    # other numbers are still numbers
    assert parse_project("name: x\nstages:\n  t: {run: a, retries: 3, resources: {time: 90}}\n",
                         "f.yaml").stages["t"].resources.time == 90 * M


def test_validate_json_writes_durations_in_slurms_form(tmp_path):
    f = tmp_path / "capsule.yaml"
    f.write_text("name: x\nstages:\n  t: {run: a, resources: {time: 2h}}\ntargets: {slurm: {time: 1d}}\n")
    r = run_capsule("validate", str(f), "--json")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["stages"]["t"]["resources"]["time"] == "02:00:00" and doc["targets"]["slurm"]["time"] == "1-00:00:00"


def test_capsule_validate_refuses_a_bad_duration_in_one_line(tmp_path):
    f = tmp_path / "capsule.yaml"
    f.write_text("name: x\nstages:\n  t:\n    run: a\n    resources: {time: abc}\n")
    r = run_capsule("validate", str(f))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: {f}:5: stages.t.resources.time: 'abc' is not a duration; use 90m, 2h, 1h30m, 1d, "
                        "or Slurm's minutes (90), MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS\n")


@pytest.mark.parametrize("backend,rendered", [
    ("local", None), ("docker", None),  # no time limit there: the dry run must simply work
    ("slurm", "#SBATCH --time=02:00:00\n"), ("kubernetes", "\n  activeDeadlineSeconds: 7200\n"),
])
def test_two_hours_on_every_backends_dry_run(tmp_path, backend, rendered):
    (tmp_path / "capsule.yaml").write_text("name: demo\nstages:\n  t:\n    run: python t.py\n"
                                           "    resources: {time: 2h}\n")
    r = run_capsule("run", "t", "--on", backend, "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    if rendered:
        assert rendered in r.stdout


def test_slurm_target_time_is_the_default_and_kubeflow_gets_the_deadline(tmp_path):
    (tmp_path / "capsule.yaml").write_text(
        "name: demo\nstages:\n  t: {run: train.py, distributed: ddp}\n  u: {run: train.py, distributed: ddp, "
        "resources: {time: 90m}}\ntargets:\n  slurm: {time: 1-12}\n  kubernetes: {operator: kubeflow}\n")
    r = run_capsule("run", "t", "--on", "slurm", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0 and "#SBATCH --time=1-12:00:00\n" in r.stdout, r.stderr
    r = run_capsule("run", "u", "--on", "slurm", "--dry-run", cwd=tmp_path)  # the stage's own limit wins
    assert r.returncode == 0 and "#SBATCH --time=01:30:00\n" in r.stdout, r.stderr
    r = run_capsule("run", "u", "--on", "kubernetes", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (job,) = [d for d in yaml.safe_load_all(r.stdout) if d["kind"] == "PyTorchJob"]
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 5400
