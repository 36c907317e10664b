"""Local backend: the stage runs on this machine, under torchrun for `distributed: ddp`.

Each job gets a small directory under $CAPSULE_HOME/jobs (default ~/.capsule/jobs) so that
`capsule jobs status/logs/cancel` work from any later CLI invocation:

    job.json     what was launched (argv, env, cwd, log path) and the supervisor's pid
    state.json   written by the supervisor: RUNNING, then the final state and exit code

A detached supervisor process (`python -m torchcapsule.launch.local JOB_DIR`) starts the
command in its own process group, copies its output (already prefixed `[rankN]:` by
torchrun --tee) into <logs volume>/jobs/<id>.log, and records how it ended: the failing
rank and that rank's own exit code, which torchrun itself reduces to 1.
"""
from __future__ import annotations

import codecs
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from .. import dirlock
from .._util import free_port
from ..doctor.probes import visible_gpus
from ..errors import BackendError, CheckpointBusy, JobNotFound
from .api import Backend, DryRun, JobSpec, JobState, JobStatus
from ._proc import pid_alive
from .command import entrypoint, stage_command
from .failure import PREEMPTED_EXIT_CODE, ended_state, explain_failure

CANCEL_GRACE_S = 30.0  # SIGTERM first (ranks save a checkpoint), SIGKILL after this
LOG_CHUNK = 1 << 16  # output is copied and streamed in pieces of at most this many bytes/characters


def jobs_home() -> Path:
    return Path(os.environ.get("CAPSULE_HOME", Path.home() / ".capsule")).expanduser() / "jobs"


# -- what a local job is ------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalRequest:
    native_id: str
    name: str
    argv: list[str]
    env: dict[str, str]  # added to the caller's environment
    cwd: str
    log: str
    distributed: bool
    retries: int = 0  # reruns of a failed non-ddp stage (ddp stages restart inside torchrun)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)  # readers never see a half-written file


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LocalBackend(Backend):
    name = "local"

    def __init__(self, project=None, **_options) -> None:
        self.project = project
        self.home = jobs_home()

    # -- hooks -------------------------------------------------------------------------------
    def check_available(self) -> None:
        return None  # this machine is always there

    def dryrun(self, spec: JobSpec) -> DryRun:
        if spec.nodes > 1:
            raise BackendError(
                f"--nodes {spec.nodes}: the local backend runs on this one machine; "
                "use --nodes 1, or --on slurm / --on kubernetes for several nodes"
            )
        native = f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        log = spec.log_dir / "jobs" / f"{native}.log"
        ddp = spec.distributed == "ddp"
        argv, env = stage_command(
            spec, python=sys.executable,
            rdzv_endpoint=f"127.0.0.1:{free_port()}" if ddp else None, rdzv_id=native,
            log_dir=str(spec.log_dir / "jobs" / native), cpu_count=os.cpu_count(),
            gpus_visible=visible_gpus() if ddp and spec.gpus.count else None)
        # Stages run in capsule's own environment: `python` is already this interpreter, and its
        # bin directory (a venv's, holding `capsule`, `pytest`, `torchrun`) leads PATH, so a stage
        # like `capsule models register` works even when the venv was never activated.
        bin_dir = str(Path(sys.executable).parent)
        path = env.get("PATH", os.environ.get("PATH", ""))
        if bin_dir not in path.split(os.pathsep):
            env["PATH"] = f"{bin_dir}{os.pathsep}{path}" if path else bin_dir
        req = LocalRequest(native_id=native, name=spec.name, argv=argv, env=env, cwd=str(spec.workdir),
                           log=str(log), distributed=spec.distributed == "ddp", retries=spec.retries)
        text = "\n".join([
            f"# local job {native}; output also in {log}",
            f"cd {shlex.quote(str(spec.workdir))}",
            "env \\",
            *[f"  {k}={shlex.quote(v)} \\" for k, v in sorted(env.items())],
            "  " + shlex.join(argv),
        ])
        return DryRun(backend=self.name, spec=spec, text=text, request=req)

    def schedule(self, dryrun: DryRun) -> str:
        req: LocalRequest = dryrun.request
        if not Path(req.cwd).is_dir():
            raise BackendError(f"stage '{dryrun.spec.stage}': working directory {req.cwd} does not exist; "
                               "check volumes.workspace / stages.*.workdir in capsule.yaml")
        _check_program(dryrun.spec, req)
        job_dir = self.home / req.native_id
        job_dir.mkdir(parents=True, exist_ok=False)
        Path(req.log).parent.mkdir(parents=True, exist_ok=True)
        _write_json(job_dir / "job.json", {**asdict(req), "submitted_at": time.time()})
        sup = subprocess.Popen(
            [sys.executable, "-m", "torchcapsule.launch.local", str(job_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(job_dir / "supervisor.err", "ab"),
            start_new_session=True,  # outlives this CLI, and Ctrl-C here does not reach it directly
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        _write_json(job_dir / "job.json", {**asdict(req), "submitted_at": time.time(), "supervisor_pid": sup.pid})
        return self.job_id(req.native_id)

    def _job_dir(self, job_id: str) -> Path:
        native = self.native(job_id)
        d = self.home / native
        if not native or "/" in native or not (d / "job.json").is_file():
            raise JobNotFound(f"no local job '{job_id}' in {self.home}; see `capsule jobs list`")
        return d

    def status(self, job_id: str) -> JobStatus:
        d = self._job_dir(job_id)
        job = _read_json(d / "job.json") or {}
        st = _read_json(d / "state.json") or {}
        state = JobState(st.get("state", "PENDING"))
        if not state.terminal and job.get("supervisor_pid") and not pid_alive(job["supervisor_pid"]):
            # Re-read: the supervisor may have written its final state just before exiting.
            st = _read_json(d / "state.json") or st
            state = JobState(st.get("state", "PENDING"))
            if not state.terminal:
                state, st = JobState.FAILED, {**st, "reason": "the job's supervisor process died; see its log"}
        return JobStatus(job_id=self.job_id(d.name), state=state, exit_code=st.get("exit_code"),
                         reason=st.get("reason"), name=job.get("name"),
                         started_at=st.get("started_at"), finished_at=st.get("finished_at"))

    def log_path(self, job_id: str) -> Path:
        return Path((_read_json(self._job_dir(job_id) / "job.json") or {})["log"])

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        path = self.log_path(job_id)
        deadline = time.monotonic() + 30
        while not path.exists():  # the supervisor creates it within moments of the submit
            if not follow or self.status(job_id).state.terminal or time.monotonic() > deadline:
                return
            time.sleep(0.1)
        with open(path, encoding="utf-8", errors="replace") as fh:
            pending = ""
            while True:
                chunk = fh.readline(LOG_CHUNK)  # bounded: a 100 MB line without newline is read in pieces
                if chunk:
                    pending += chunk
                    if pending.endswith("\n") or len(pending) >= LOG_CHUNK:
                        yield pending.rstrip("\n")  # an overlong line comes out as several
                        pending = ""
                    continue
                if not follow:
                    break
                if self.status(job_id).state.terminal:
                    while rest := fh.readline(LOG_CHUNK):  # what arrived since the last read, bounded
                        pending += rest
                        if pending.endswith("\n") or len(pending) >= LOG_CHUNK:
                            yield pending.rstrip("\n")
                            pending = ""
                    if pending:
                        yield pending
                    return
                time.sleep(0.1)
            if pending:
                yield pending

    def _cancel_ended(self, native: str) -> None:
        d = self._job_dir(self.job_id(native))
        if _supervisor_died(d):  # what it started may still run, out of everyone's reach
            end_leftovers(d)

    def _cancel_existing(self, native: str) -> None:
        d = self._job_dir(self.job_id(native))
        (d / "cancel").write_text(str(time.time()))
        pid = (_read_json(d / "job.json") or {}).get("supervisor_pid")
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)  # the supervisor forwards it to the job's process group

    def list(self) -> list[JobStatus]:
        if not self.home.is_dir():
            return []
        out = []
        for d in self.home.iterdir():
            if (d / "job.json").is_file():
                out.append(self.status(self.job_id(d.name)))
        return sorted(out, key=lambda s: (s.started_at or 0, s.job_id))


def _pythonpath() -> str:
    """Make sure the supervisor imports this same torchcapsule (e.g. a source checkout)."""
    here = str(Path(__file__).resolve().parents[2])
    cur = os.environ.get("PYTHONPATH", "")
    return here if not cur else (cur if here in cur.split(os.pathsep) else f"{here}{os.pathsep}{cur}")


def _check_program(spec: JobSpec, req: LocalRequest) -> None:
    """One-line errors before launching: a script or program that does not exist."""
    cwd, stage = Path(req.cwd), spec.stage
    fix = f"fix stages.{stage}.run in capsule.yaml"
    if req.distributed:
        target = entrypoint(spec.command, stage=stage)
        if target[0] != "-m" and not (cwd / target[0]).is_file():
            raise BackendError(f"stage '{stage}': script {target[0]} not found in {cwd}; {fix}")
        return
    prog = req.argv[0]
    found = (cwd / prog).exists() if "/" in prog else shutil.which(prog, path=req.env.get("PATH", os.environ.get("PATH"))) is not None
    if not found:
        raise BackendError(f"stage '{stage}': program '{prog}' not found; {fix}")
    if prog == sys.executable and len(req.argv) > 1 and req.argv[1].endswith(".py") \
            and not (cwd / req.argv[1]).is_file():
        raise BackendError(f"stage '{stage}': script {req.argv[1]} not found in {cwd}; {fix}")


# -- the supervisor (runs detached, one per job) ----------------------------------------------
def job_status(job_id: str, returncode: int, output: str, *, cancelled: bool) -> JobStatus:
    """How the job's command ended (its return code, the end of its output) -> JobStatus (pure).
    The supervisor records it in state.json."""
    if returncode == 0 and not cancelled:
        return JobStatus(job_id, JobState.SUCCEEDED, 0)
    code, reason = explain_failure(returncode, output, tail_lines=0)  # the log is right here
    if cancelled:
        return JobStatus(job_id, JobState.CANCELLED, code,
                         reason if code == PREEMPTED_EXIT_CODE else "cancelled")
    return JobStatus(job_id, ended_state(code) if code else JobState.SUCCEEDED, code, reason if code else None)


def supervise(job_dir: Path) -> int:
    job = json.loads((job_dir / "job.json").read_text())
    env = {**os.environ, **job["env"], "CAPSULE_JOB_ID": f"local:{job['native_id']}"}
    started = time.time()
    log = open(job["log"], "a", encoding="utf-8", errors="replace", buffering=1)
    busy = _hold_checkpoints(job, env)
    if busy:
        log.write(f"error: {busy}\n")
        log.close()
        _write_json(job_dir / "state.json", {"state": "FAILED", "exit_code": 1, "reason": busy,
                                              "started_at": started, "finished_at": time.time()})
        return 1
    cancelled: dict[str, float | None] = {"at": None}
    current: dict[str, int | None] = {"pid": None}

    def on_term(signum, frame):
        if cancelled["at"] is None:
            cancelled["at"] = time.monotonic()
            if current["pid"] is not None:
                try:
                    os.killpg(current["pid"], signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # ddp stages retry inside torchrun (--max_restarts); other stages are rerun here on failure.
    attempts = 1 if job["distributed"] else 1 + int(job.get("retries", 0))
    for attempt in range(attempts):
        if attempt:
            log.write(f"[capsule] exit code {code}; retry {attempt}/{attempts - 1}\n")
        rc, text, pid = _run_once(job, env, log, job_dir, started, cancelled, current)
        if rc is None:  # could not start at all
            return 127
        end = job_status(env["CAPSULE_JOB_ID"], rc, text,
                         cancelled=cancelled["at"] is not None or (job_dir / "cancel").exists())
        code = end.exit_code
        if end.state is not JobState.FAILED:
            break
    if end.reason:
        log.write(f"[capsule] {end.state.value}: {end.reason}\n")
    log.close()
    _write_json(job_dir / "state.json", {"state": end.state.value, "exit_code": code, "reason": end.reason,
                                          "pid": pid, "started_at": started, "finished_at": time.time()})
    return code


def _run_once(job: dict, env: dict, log, job_dir: Path, started: float, cancelled: dict,
              current: dict) -> tuple[int | None, str, int | None]:
    """Start the command once, copy its output to the log; (returncode, output tail, pid)."""
    import threading

    try:
        child = subprocess.Popen(job["argv"], cwd=job["cwd"], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True,  # its own group: cancel signals all of it
                                 preexec_fn=_die_with_parent())
    except OSError as e:
        log.write(f"error: cannot start {job['argv'][0]}: {e}\n")
        _write_json(job_dir / "state.json", {"state": "FAILED", "exit_code": 127, "reason": str(e),
                                              "started_at": started, "finished_at": time.time()})
        return None, "", None
    current["pid"] = child.pid
    _write_json(job_dir / "state.json", {"state": "RUNNING", "pid": child.pid, "started_at": started})
    own = _proc_stat(child.pid)
    if own:  # recorded, so `capsule jobs cancel` can end the job even if this supervisor dies
        _write_json(job_dir / "procs.json", {"procs": {str(child.pid): own[1]}})
    if cancelled["at"] is not None:  # cancelled between two attempts
        os.killpg(child.pid, signal.SIGTERM)
    tail: deque[str] = deque(maxlen=400)
    seen: dict[int, int] = {}  # every process the job started (torchrun puts ranks in own sessions)

    ended = threading.Event()  # set when the child exits, so the watcher stops at once

    def watch():  # note the job's processes; SIGKILL them if they ignore SIGTERM for too long
        while child.poll() is None:
            now = _descendants(child.pid)
            if not now.items() <= seen.items():
                seen.update(now)  # recorded, so `capsule jobs cancel` can end them if we die
                _write_json(job_dir / "procs.json", {"procs": {str(k): v for k, v in seen.items()}
                                                     | ({str(child.pid): own[1]} if own else {})})
            if cancelled["at"] is not None and time.monotonic() - cancelled["at"] > CANCEL_GRACE_S:
                _kill_seen(seen)
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            ended.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert child.stdout is not None
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a piece may split a character
    for raw in iter(lambda: child.stdout.readline(LOG_CHUNK), b""):  # bounded, whatever the line length
        line = decode.decode(raw)
        log.write(line)
        tail.append(line[-4096:])  # the summary lines are short; a huge line must not fill the tail
    log.write(decode.decode(b"", final=True))
    rc = child.wait()
    ended.set()
    watcher.join(timeout=5)  # it ends with the child; then `seen` no longer changes
    # If torchrun died first (killed, or signalled twice), its ranks may still be finishing a
    # preemption checkpoint: give them the grace period, then make sure none outlives the job.
    _wait_seen(seen, CANCEL_GRACE_S if cancelled["at"] is not None else 5.0)
    _kill_seen(seen)
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    text = "".join(tail)
    if job["distributed"]:
        text += _rank_stderr_tails(Path(job["log"]).with_suffix(""))
    return rc, text, child.pid


def _die_with_parent():
    """preexec_fn: the job's top process gets SIGTERM when the supervisor dies, however it dies
    (kill -9 included), so torchrun stops its ranks, which save a checkpoint and exit."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the watcher and `jobs cancel` still end the job
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def _hold_checkpoints(job: dict, env: dict) -> str | None:
    """A ddp stage's checkpoint directory is held by this supervisor for the job's whole life, so
    no second run writes into it, even between torchrun's restarts; the ranks see it is held
    for them. Returns the one-line refusal when another run holds it."""
    if not job["distributed"]:
        return None
    ckdir = Path(job["cwd"]) / dirlock.checkpoint_dir(env)
    who = f"local:{job['native_id']} (supervisor pid {os.getpid()})"
    try:
        dirlock.acquire(ckdir, who)
    except CheckpointBusy as e:
        return str(e)
    except OSError:
        return None  # an unwritable volume: the ranks will say so themselves
    env["CAPSULE_CHECKPOINT_LOCK_HELD"] = who  # train.checkpoint.LOCK_HELD_ENV (not imported: torch)
    return None


def _supervisor_died(job_dir: Path) -> bool:
    st = _read_json(job_dir / "state.json") or {}
    pid = (_read_json(job_dir / "job.json") or {}).get("supervisor_pid")
    return not JobState(st.get("state", "PENDING")).terminal and bool(pid) and not pid_alive(pid)


def end_leftovers(job_dir: Path, grace_s: float = CANCEL_GRACE_S) -> int:
    """End what a dead supervisor left running: the processes it recorded, each checked to still be
    the same process (pid and start time). SIGTERM (the ranks checkpoint), SIGKILL after grace_s.
    Records the job as CANCELLED; returns how many processes were still running."""
    recorded = (_read_json(job_dir / "procs.json") or {}).get("procs", {})
    left = {int(pid): start for pid, start in recorded.items()
            if (st := _proc_stat(int(pid))) is not None and st[1] == start}
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _wait_seen(left, grace_s)
    _kill_seen(left)
    old = _read_json(job_dir / "state.json") or {}
    _write_json(job_dir / "state.json", {
        **old, "state": "CANCELLED", "exit_code": old.get("exit_code"), "finished_at": time.time(),
        "reason": f"cancelled after its supervisor died: {len(left)} leftover process(es) ended"})
    return len(left)


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # finished, waiting to be reaped: not running
            return None
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every process below pid (e.g. torchrun's ranks, in sessions of their own)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        for c, start in children.get(todo.pop(), []):
            out[c] = start
            todo.append(c)
    return out


def _wait_seen(seen: dict[int, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any((st := _proc_stat(pid)) is not None and st[1] == start for pid, start in seen.items()):
            return
        time.sleep(0.1)


def _kill_seen(seen: dict[int, int]) -> None:
    """SIGKILL the processes seen earlier that still run (same pid AND same start time: no reuse)."""
    for pid, start in seen.items():
        st = _proc_stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _rank_stderr_tails(torchrun_log_dir: Path, nbytes: int = 4096) -> str:
    """The ends of each rank's own stderr file (torchrun --log_dir): when torchrun is signalled it
    may exit before its console tee has copied the ranks' last lines, these files still have them."""
    out = []
    for f in sorted(torchrun_log_dir.glob("*/attempt_*/*/stderr.log")):
        try:
            with open(f, "rb") as fh:
                fh.seek(max(0, f.stat().st_size - nbytes))
                out.append(fh.read().decode("utf-8", errors="replace"))
        except OSError:
            continue
    return "\n" + "\n".join(out) if out else ""


if __name__ == "__main__":  # the detached supervisor: python -m torchcapsule.launch.local JOB_DIR
    sys.exit(supervise(Path(sys.argv[1])))
