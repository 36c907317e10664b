"""`capsule pipeline run` for real on the local backend, with a toy project whose stages are
small Python scripts: a failure stops the run and the rerun resumes at the failed stage,
unchanged stages are skipped, --force reruns, Ctrl-C (SIGINT) cancels the running stage and
records the run as interrupted, and the next run resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import run_capsule

pytestmark = pytest.mark.integration

# Each stage appends its name to ran.log, so the test sees exactly which stages executed.
STAGE = """
import json, os, sys, time
from pathlib import Path
name = sys.argv[1]
Path("ran.log").open("a").write(name + "\\n")
print(f"{name}: starting", flush=True)
if name == "build":
    if Path("FAIL_BUILD").exists():
        print("build: injected failure", flush=True)
        sys.exit(3)
    Path("logs").mkdir(exist_ok=True)
    Path("logs/metrics-build.json").write_text(json.dumps({"accuracy": 0.875, "loss": 0.3}))
if name == "slow" and Path("HOLD").exists():  # runs until the test removes HOLD
    Path("slow.pid").write_text(str(os.getpid()))
    while Path("HOLD").exists():
        time.sleep(0.05)
if name == "slow" and Path("SLOW").exists():
    Path("slow.pid").write_text(str(os.getpid()))
    time.sleep(120)
if name == "report":
    print("registered models:/toy/7 (alias champion)", flush=True)
Path("out").mkdir(exist_ok=True)
Path(f"out/{name}.txt").write_text(name)
print(f"{name}: done", flush=True)
"""

CAPSULE = """
name: toy
stages:
  prep:
    run: python stage.py prep
    inputs: ["stage.py", "params.txt"]
  build:
    run: python stage.py build
    needs: [prep]
    inputs: ["out/prep.txt"]
    outputs: ["out/build.txt"]
  report:
    run: python stage.py report
    needs: [build]
"""

SLOW_CAPSULE = """
name: toyslow
stages:
  prep:
    run: python stage.py prep
    inputs: ["stage.py"]
  slow:
    run: python stage.py slow
    needs: [prep]
"""


def _project(tmp_path: Path, yaml_text: str) -> Path:
    (tmp_path / "capsule.yaml").write_text(yaml_text)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "params.txt").write_text("lr=0.1\n")
    return tmp_path


def _ran(p: Path) -> list[str]:
    f = p / "ran.log"
    return f.read_text().split() if f.exists() else []


def _states(rec: dict) -> dict[str, str]:
    return {s["name"]: s["state"] for s in rec["stages"]}


def _env(p: Path) -> dict:
    return {"CAPSULE_HOME": str(p / ".home")}  # the local backend's job directories stay in tmp


def _status(p: Path, *args: str) -> dict:
    r = run_capsule("pipeline", "status", *args, "--json", cwd=p, timeout=60, env=_env(p))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _run(p: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_capsule("pipeline", "run", "--no-doctor", *args, cwd=p, timeout=timeout, env=_env(p))


def test_failure_stops_the_run_and_the_rerun_resumes_at_the_failed_stage(tmp_path):
    p = _project(tmp_path, CAPSULE)
    (p / "FAIL_BUILD").touch()
    r = _run(p)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _ran(p) == ["prep", "build"]  # report never started
    first = _status(p)
    assert first["state"] == "failed"
    assert _states(first) == {"prep": "succeeded", "build": "failed", "report": "pending"}
    build = first["stages"][1]
    assert build["exit_code"] == 3 and "injected failure" in build["reason"]
    assert build["command"] == ["python", "stage.py", "build"]
    assert Path(build["log"]).read_text().count("build: injected failure") == 1
    prep = first["stages"][0]
    assert set(prep["inputs"]) == {"stage.py", "params.txt"} and len(prep["fingerprint"]) == 64
    assert prep["job_id"].startswith("local:") and prep["duration_s"] > 0
    assert first["image"].startswith("toy:") and first["backend"] == "local"
    assert "build" in r.stdout and "failed" in r.stdout

    (p / "FAIL_BUILD").unlink()
    r = _run(p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming run " + first["run_id"] in r.stdout
    assert _ran(p) == ["prep", "build", "build", "report"]  # prep skipped, resumed at build
    second = _status(p)
    assert second["resumed_from"] == first["run_id"] and second["state"] == "succeeded"
    assert _states(second) == {"prep": "skipped", "build": "succeeded", "report": "succeeded"}
    assert second["stages"][0]["cached_from"] == first["run_id"]
    assert second["stages"][1]["metric"] == {"accuracy": 0.875}  # key metric for the progress view
    assert second["model_version"] == "models:/toy/7"

    # nothing changed: everything is skipped
    r = _run(p)
    assert r.returncode == 0 and _ran(p) == ["prep", "build", "build", "report"], r.stdout + r.stderr
    assert set(_states(_status(p)).values()) == {"skipped"}

    # --force reruns all
    r = _run(p, "--force")
    assert r.returncode == 0 and _ran(p)[4:] == ["prep", "build", "report"], r.stderr

    # an input of prep changes: prep reruns, and so do the stages downstream of it
    (p / "params.txt").write_text("lr=0.2\n")
    r = _run(p)
    assert r.returncode == 0 and _ran(p)[7:] == ["prep", "build", "report"], r.stderr
    st = _status(p)
    assert st["stages"][0]["reason"] == "inputs changed: params.txt"
    assert st["stages"][1]["reason"] == "config, image or an upstream stage changed"

    # a declared output disappears: that stage reruns; report, whose fingerprint (build's
    # inputs and config) did not change, stays skipped
    (p / "out" / "build.txt").unlink()
    r = _run(p)
    assert r.returncode == 0 and _ran(p)[10:] == ["build"], r.stderr
    st = _status(p)
    assert st["stages"][1]["reason"] == "outputs missing: out/build.txt"
    assert _states(st) == {"prep": "skipped", "build": "succeeded", "report": "skipped"}

    # a failing attempt does not borrow the metric file an earlier success left behind
    (p / "FAIL_BUILD").touch()
    r = _run(p, "--only", "build", "--force")
    assert r.returncode == 1 and _status(p)["stages"][0]["metric"] is None, r.stdout
    (p / "FAIL_BUILD").unlink()
    _ran_before = len(_ran(p))

    # --from and --only
    r = _run(p, "--only", "report", "--force")
    assert r.returncode == 0 and _ran(p)[_ran_before:] == ["report"], r.stderr
    assert [s["name"] for s in _status(p)["stages"]] == ["report"]
    r = _run(p, "--from", "build", "--force")
    assert r.returncode == 0 and _ran(p)[_ran_before + 1:] == ["build", "report"], r.stderr

    # every run left a record; status --all lists them, status RUN shows one
    runs = _status(p, "--all")
    assert len(runs) == 9 and runs[-1]["run_id"] == first["run_id"]
    assert _status(p, first["run_id"][:20])["run_id"] == first["run_id"]
    r = run_capsule("pipeline", "status", first["run_id"], cwd=p, env=_env(p))
    assert r.returncode == 0 and "failed" in r.stdout and "build" in r.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_the_running_stage_records_interrupted_and_the_next_run_resumes(tmp_path, sig):
    p = _project(tmp_path, SLOW_CAPSULE)
    (p / "SLOW").touch()
    proc = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", "pipeline", "run", "--no-doctor"],
                            cwd=p, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **_env(p)})
    try:
        deadline = time.monotonic() + 120
        while not (p / "slow.pid").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the slow stage never started"
            time.sleep(0.2)
        stage_pid = int((p / "slow.pid").read_text())
        proc.send_signal(sig)  # SIGTERM: what docker stop / kubectl delete / Slurm send
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    rec = _status(p)
    assert rec["state"] == "interrupted"
    assert _states(rec) == {"prep": "succeeded", "slow": "interrupted"}
    # the stage's process was stopped, not left behind
    deadline = time.monotonic() + 15
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage_pid), f"stage process {stage_pid} still running after Ctrl-C"

    (p / "SLOW").unlink()
    r = _run(p)
    assert r.returncode == 0, r.stdout + r.stderr
    again = _status(p)
    assert again["resumed_from"] == rec["run_id"]
    assert _states(again) == {"prep": "skipped", "slow": "succeeded"}
    assert _ran(p) == ["prep", "slow", "slow"]


@pytest.mark.parametrize("force", [False, True], ids=["adopts", "force-cancels"])
def test_rerun_after_a_killed_pipeline_never_runs_a_second_job_beside_the_orphan(tmp_path, force):
    """kill -9 of `capsule pipeline run` leaves its stage's job running. The rerun adopts that job
    (same inputs) or, with --force, cancels it and waits for its end before starting a new one."""
    p = _project(tmp_path, SLOW_CAPSULE)
    (p / "HOLD").touch()
    cmd = [sys.executable, "-m", "torchcapsule.cli.main", "pipeline", "run", "--no-doctor"]
    first = subprocess.Popen(cmd, cwd=p, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **_env(p)})
    try:
        _wait(lambda: (p / "slow.pid").exists() or first.poll() is not None, "the slow stage to start")
    finally:
        first.kill()
        first.wait(timeout=60)
    orphan = int((p / "slow.pid").read_text())
    assert _alive(orphan)  # the job outlived its pipeline
    killed = _status(p)
    assert killed["state"] == "interrupted"
    old_job = next(s["job_id"] for s in killed["stages"] if s["name"] == "slow")
    (p / "slow.pid").unlink()
    rerun = subprocess.Popen([*cmd, *(["--force"] if force else [])], cwd=p, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **_env(p)})
    try:
        if force:  # the orphan ends before its replacement starts
            _wait(lambda: (p / "slow.pid").exists() or rerun.poll() is not None, "the new slow stage")
            assert not _alive(orphan)
        else:
            # the killed run's own record names old_job too: wait for the rerun's record to name
            # it, else HOLD goes before the rerun looked and the orphan ends unadopted
            _wait(lambda: _rerun_adopted(p, killed["run_id"], old_job) or rerun.poll() is not None,
                  "the rerun to adopt")
        (p / "HOLD").unlink()
        out, err = rerun.communicate(timeout=180)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    assert rerun.returncode == 0, out + err
    rec = _status(p)
    assert rec["resumed_from"] == killed["run_id"] and _states(rec)["slow"] == "succeeded"
    if force:
        assert "cancelling job" in out + err and _stage_job(p, "slow") != old_job
        assert _ran(p) == ["prep", "slow", "prep", "slow"]  # --force reruns every stage, once
    else:
        assert f"adopting job {old_job}" in out + err and _stage_job(p, "slow") == old_job
        assert _ran(p) == ["prep", "slow"]  # the stage ran once: no second job beside the orphan


def _stage_job(p: Path, name: str) -> str | None:
    return next(s["job_id"] for s in _status(p)["stages"] if s["name"] == name)


def _rerun_adopted(p: Path, killed_run: str, job: str) -> bool:
    rec = _status(p)
    return rec["run_id"] != killed_run and any(s["name"] == "slow" and s["job_id"] == job for s in rec["stages"])


def _wait(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("yaml_text, args, expect", [
    ("name: t\nstages:\n  a: {run: 'true', needs: [b]}\n  b: {run: 'true', needs: [a]}\n", (),
     "stages.a.needs: cycle"),
    ("name: t\nstages:\n  a: {run: 'true', needs: [bb]}\n  b: {run: 'true'}\n", (),
     "stages.a.needs: unknown stage 'bb' (did you mean 'b'?)"),
    ("name: t\nstages:\n  a: {run: 'true'}\n", ("--from", "z"), "--from: unknown stage 'z'"),
    ("name: t\nstages:\n  a: {run: 'true'}\n", ("--on", "mars"), "--on: unknown backend 'mars'"),
    ("name: t\nschedule: {cron: '61 * * * *'}\nstages:\n  a: {run: 'true'}\n", (), "schedule.cron"),
    ("name: t\n", (), "stages: none defined"),
])
def test_bad_input_is_one_line_naming_the_stage_and_fix(tmp_path, yaml_text, args, expect):
    (tmp_path / "capsule.yaml").write_text(yaml_text)
    r = _run(tmp_path, *args)
    assert r.returncode in (1, 2), r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_preflight_doctor_is_recorded(tmp_path):
    p = _project(tmp_path, "name: toy\nstages:\n  prep:\n    run: python stage.py prep\n")
    r = run_capsule("pipeline", "run", cwd=p, timeout=300, env=_env(p))
    assert r.returncode == 0, r.stdout + r.stderr
    pre = _status(p)["preflight"]
    assert pre["command"] == ["capsule", "doctor"] and pre["exit_code"] == 0
