"""Training runs in a real MLflow store: the digits training through `capsule run` becomes one run
with its curve, params and lineage, and `capsule models register` links the version to it; a
restarted logger continues the same run at its step; a store that is down or slow never fails
nor holds up the training (close() does not wait for it) and what it missed arrives through the
launcher's catch-up once it is back (`capsule ui` serves the store over HTTP)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import REPO, missing_part, run_capsule
from .train_support import capsule_env, example_copy

pytestmark = pytest.mark.integration


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _records(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_REGISTRY_URI": "",
           "PYTHONPATH": str(REPO / "src")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def digits(tmp_path_factory, mlflow_installed):
    """The digits example trained for 3 epochs with `capsule run train` (2 DDP ranks) in a git
    checkout, then registered: (project dir, store URI, training run id, `models register` JSON)."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    proj = example_copy(tmp_path, epochs=3)
    git = ["git", "-C", str(proj), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "digits"], check=True)
    # The project's own embedded store: a tracking URI that an earlier in-process test left in
    # os.environ (MLflow's set_tracking_uri exports it) must not send this training elsewhere.
    r = run_capsule("run", "train", cwd=proj, env={**capsule_env(tmp_path), **_env()}, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = json.loads((proj / "logs" / "metrics-train.mlflow.json").read_text())["run_id"]
    r = run_capsule("models", "register", "--json", cwd=proj, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return proj, f"sqlite:///{proj}/.capsule/mlflow.db", run_id, json.loads(r.stdout)


def test_digits_training_is_one_run_with_curve_lineage_and_source_version(digits):
    proj, uri, run_id, registered = digits
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert tags["capsule.kind"] == "training" and tags["capsule.stage"] == "train"
    assert tags["capsule.command"] == "train.py --epochs 3"
    assert tags["capsule.world_size"] == "2" and params["world_size"] == "2"
    assert tags["capsule.image_tag"].startswith("digits:2.13.0-")
    assert len(tags["capsule.lock_hash"]) == 64 and len(tags["mlflow.source.git.commit"]) == 40
    assert params["epochs"] == "3" and params["lr"] == "0.002"
    # one point per logged step: the MLflow history is the JSONL's curve, exactly
    logged = [(rec["step"], rec["loss"]) for rec in _records(proj / "logs" / "metrics-train.jsonl") if "loss" in rec]
    assert len(logged) == 3
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == logged
    # the version's source run is the training, and the training names its version
    assert registered["run_id"] == run_id
    assert client.get_run(run_id).data.tags["capsule.registered_version"] == f"digits/{registered['version']}"


_LOGGER = textwrap.dedent("""
    import json, sys
    from torchcapsule.train import MetricsLogger
    path, uri, first, last, event = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    m = MetricsLogger(path, rank=0, tracking_uri=uri, params={"lr": 0.1})
    follower = m._follower
    m.event(event, first - 1)
    for step in range(first, last + 1):
        m.log(step, loss=1.0 / step)
    m.event("finished", last)
    m.close()
    print(json.dumps({"follower_running_after_close": follower is not None and follower.poll() is None}))
""")


def _train(tmp_path: Path, jsonl: Path, uri: str, first: int, last: int, event: str, *, timeout: float = 600,
           **env: str) -> dict:
    """The stub training, then the launcher's catch-up (as `capsule run` does once the job ends).
    Returns what the stub saw after close()."""
    from torchcapsule.registry import tracking

    script = tmp_path / "train_stub.py"
    script.write_text(_LOGGER)
    # a new SQLite store's migrations take tens of seconds on a loaded 2-core machine: close()
    # waits for them (only them), so that they are never cut
    env = {"CAPSULE_TRACKING_FLUSH_TIMEOUT": "300", **env}
    r = subprocess.run([sys.executable, str(script), str(jsonl), uri, str(first), str(last), event],
                       env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _spec(logs: Path, uri: str):
    from torchcapsule.launch.api import JobSpec

    vols = {v: logs.parent / v for v in ("workspace", "data", "models", "logs")}
    vols["logs"] = logs
    return JobSpec(project="p", stage="train", command=("train.py",), image="img", workdir=logs.parent,
                   volumes=vols, tracking={"CAPSULE_TRACKING_URI": uri})


def _follower_done(jsonl: Path, deadline_s: float = 300) -> str:
    """The follower's last line in its log: it runs on after close(), in the background."""
    import time

    log = jsonl.with_name("metrics-train.tracking.log")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        text = log.read_text() if log.exists() else ""
        if "tracking: done" in text:
            return text
        time.sleep(0.5)
    raise AssertionError(f"the follower never finished within {deadline_s:.0f}s: {log} says {text[-2000:]!r}")


def test_resumed_training_continues_the_same_run_at_its_step(tmp_path, mlflow_installed):
    from torchcapsule.registry.tracking import catch_up_job

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    jsonl = tmp_path / "logs" / "metrics-train.jsonl"
    _train(tmp_path, jsonl, uri, 1, 20, "started")
    assert catch_up_job(_spec(jsonl.parent, uri)) == []
    first = json.loads((tmp_path / "logs" / "metrics-train.mlflow.json").read_text())["run_id"]
    _train(tmp_path, jsonl, uri, 21, 40, "resumed")
    assert catch_up_job(_spec(jsonl.parent, uri)) == []
    state = json.loads((tmp_path / "logs" / "metrics-train.mlflow.json").read_text())
    assert state["run_id"] == first and state["offset"] == jsonl.stat().st_size
    client = _client(uri)
    assert [m.step for m in sorted(client.get_metric_history(first, "loss"), key=lambda m: m.step)] == list(range(1, 41))
    assert client.get_run(first).info.status == "FINISHED"
    # a new training ("started") is a new run
    _train(tmp_path, jsonl, uri, 1, 5, "started")
    assert catch_up_job(_spec(jsonl.parent, uri)) == []
    second = json.loads((tmp_path / "logs" / "metrics-train.mlflow.json").read_text())["run_id"]
    assert second != first and len(client.get_metric_history(second, "loss")) == 5


def test_store_down_never_fails_training_and_catches_up_when_back(tmp_path, mlflow_installed):
    from torchcapsule.registry import tracking

    from torchcapsule._util import free_port

    port = free_port()
    server = f"http://127.0.0.1:{port}"
    jsonl = tmp_path / "logs" / "metrics-train.jsonl"
    # nothing listens on the port: the follower fails and backs off; close() does not wait for it
    # (it retries for 20 s after the training's end, in the background)
    seen = _train(tmp_path, jsonl, server, 1, 50, "started", CAPSULE_REGISTRY_PROBE_TIMEOUT="1")
    assert seen["follower_running_after_close"]
    assert len(_records(jsonl)) == 52  # the JSONL has everything
    assert tracking.catch_up_job(_spec(jsonl.parent, server))[0].startswith(f"{jsonl}: metrics not sent to MLflow yet")
    assert "cannot reach MLflow tracking server" in _follower_done(jsonl)
    assert tracking.pending_bytes(jsonl) == jsonl.stat().st_size

    # the store comes back: `capsule ui` serves the project's embedded store on that port
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "capsule.yaml").write_text("name: stub\nstages:\n  train: {run: python train.py}\n")
    ui = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", "ui", "--port", str(port)],
                          cwd=proj, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ui.stdout.readline()
        assert line.startswith(f"MLflow UI: {server}"), line + ui.stderr.read()
        notes = tracking.catch_up_job(_spec(tmp_path / "logs", server))
        assert notes == []
        run_id = tracking.run_id_of(jsonl)
        assert [s for s, _ in tracking.metric_history(server, run_id, "loss")] == list(range(1, 51))
        assert tracking.pending_bytes(jsonl) == 0
    finally:
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
    assert "MLflow UI stopped" in ui.stdout.read()
    with pytest.raises(OSError):  # the server went with it
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_close_does_not_wait_for_a_slow_store_and_the_launcher_catch_up_sends_the_rest(tmp_path, mlflow_installed):
    """The store is busy for the whole training (another writer holds the SQLite store's lock):
    close() returns at once, the training exits, and once the store is free the launcher's
    catch_up_job and the follower's own last sync deliver every step exactly once."""
    from torchcapsule.registry import tracking
    from torchcapsule.registry.store import writer_lock

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    _client(uri).search_experiments()  # an existing store: close() owes no migration a wait
    jsonl = tmp_path / "logs" / "metrics-train.jsonl"
    with writer_lock(uri):
        # close() waiting on the blocked follower at all would wait FLUSH_TIMEOUT = 600 s, far
        # past this call's own limit: the training exiting in time is what is asserted
        seen = _train(tmp_path, jsonl, uri, 1, 200, "started", timeout=240, CAPSULE_TRACKING_FLUSH_TIMEOUT="600")
        assert seen["follower_running_after_close"]
        assert tracking.pending_bytes(jsonl) == jsonl.stat().st_size  # nothing reached the store
    assert tracking.catch_up_job(_spec(jsonl.parent, uri)) == []
    assert tracking.pending_bytes(jsonl) == 0
    run_id = tracking.run_id_of(jsonl)
    client = _client(uri)
    assert [s for s, _ in tracking.metric_history(uri, run_id, "loss")] == list(range(1, 201))
    assert client.get_run(run_id).info.status == "FINISHED"
    # the follower finishes on its own afterwards and sends nothing twice (one run, one point a step)
    assert "0 bytes left" in _follower_done(jsonl)
    assert [s for s, _ in tracking.metric_history(uri, run_id, "loss")] == list(range(1, 201))
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]


def test_pipeline_sends_what_a_stage_could_not_send_itself(tmp_path, mlflow_installed):
    """A job that wrote its metrics JSONL but could not reach the store (here: no follower at all,
    as in a container whose store is outside the mounted volumes): `capsule pipeline run` sends
    the lines once the job ends, like `capsule run` does, so the summary's run link exists."""
    from torchcapsule.config import load_project
    from torchcapsule.registry import tracking
    from torchcapsule.registry.store import tracking_uri

    (tmp_path / "capsule.yaml").write_text("name: caughtup\nstages:\n  train: {run: python writes.py}\n")
    (tmp_path / "writes.py").write_text(textwrap.dedent("""
        import json, pathlib
        logs = pathlib.Path("logs"); logs.mkdir(exist_ok=True)
        lines = [{"event": "started", "step": 0}] + [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
        (logs / "metrics-train.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
        """))
    r = run_capsule("pipeline", "run", "--no-doctor", cwd=tmp_path, env={**_env(), "CAPSULE_HOME": str(tmp_path / "h")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jsonl = tmp_path / "logs" / "metrics-train.jsonl"
    assert tracking.pending_bytes(jsonl) == 0
    uri = tracking_uri(load_project(tmp_path / "capsule.yaml"))
    steps = [s for s, _ in tracking.metric_history(uri, tracking.run_id_of(jsonl), "loss")]
    assert steps == [1, 2, 3, 4, 5]
    assert "MLflow run:" in r.stdout  # the summary links the run it now has


def test_tracking_off_starts_no_follower(tmp_path, mlflow_installed):
    jsonl = tmp_path / "logs" / "metrics-train.jsonl"
    _train(tmp_path, jsonl, f"sqlite:///{tmp_path}/db.sqlite", 1, 3, "started", CAPSULE_TRACKING="off")
    assert not (tmp_path / "logs" / "metrics-train.mlflow.json").exists()
    assert not (tmp_path / "db.sqlite").exists()


# -- the UI, in a real browser ------------------------------------------------------------------
ARTIFACTS = Path(os.environ.get("CAPSULE_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture()
def browser():
    """Debian's headless chromium driven by Selenium (scripts/install-system.sh, the dev extra)."""
    try:
        from selenium import webdriver
    except ImportError:
        missing_part("selenium is not installed; pip install -e '.[dev]'")
    import shutil

    chromium = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        missing_part("chromium/chromedriver not on PATH; run scripts/install-system.sh")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture()
def ui(digits):
    proc = subprocess.Popen([sys.executable, "-m", "torchcapsule.cli.main", "ui", "--port", "0"],
                            cwd=digits[0], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("MLflow UI: http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"capsule ui did not start: {line}{proc.stderr.read()}")
    yield line.split()[2]
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(timeout=60) == 0


def _wait(driver, what: str, cond, timeout: float = 120):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: cond(d))
    except TimeoutException:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "ui-timeout.png"))
        raise AssertionError(f"the MLflow UI never showed {what} (see {ARTIFACTS / 'ui-timeout.png'}); "
                             f"page text: {driver.find_element('tag name', 'body').text[:1500]}") from None


def _not_uniform(png: bytes) -> bool:
    from PIL import Image
    import io

    img = Image.open(io.BytesIO(png)).convert("RGB")
    lo, hi = zip(*img.getextrema())
    return len(img.getcolors(maxcolors=1 << 20) or ()) > 16 and any(h - l > 64 for l, h in zip(lo, hi))


def test_champion_version_and_its_training_curve_in_a_real_browser(digits, ui, browser):
    proj, uri, run_id, registered = digits
    r = run_capsule("models", "promote", "digits", registered["version"], "--alias", "champion",
                    cwd=proj, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    client = _client(uri)
    version = client.get_model_version_by_alias("digits", "champion")
    assert version.run_id == run_id
    # the champion's page links to its source run: the training
    browser.get(f"{ui}/#/models/digits/versions/{version.version}")
    link = _wait(browser, "a link to the source run", lambda d: [
        a for a in d.find_elements("css selector", "a") if run_id in (a.get_attribute("href") or "")])
    exp_id = client.get_run(run_id).info.experiment_id
    # the training run's metric charts: the loss curve, drawn
    browser.get(f"{ui}/#/experiments/{exp_id}/runs/{run_id}/model-metrics")
    _wait(browser, "the loss chart", lambda d: "loss" in d.find_element("tag name", "body").text)

    def drawn(d):  # MLflow 3's charts are plotly: an svg plot whose trace is a path.js-line
        for el in d.find_elements("css selector", ".js-plotly-plot, canvas"):
            lines = d.execute_script(
                "const e = arguments[0]; return e.tagName === 'CANVAS' ? e.width * e.height : "
                "Array.from(e.querySelectorAll('path.js-line')).filter(p => (p.getAttribute('d') || '').length > 10).length", el)
            if el.size["width"] > 100 and el.size["height"] > 100 and lines:
                return el
        return None

    chart = _wait(browser, "a drawn loss chart (plotly svg trace / canvas)", drawn)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "mlflow-ui-training-run.png"
    browser.save_screenshot(str(shot))
    assert _not_uniform(shot.read_bytes())
    assert _not_uniform(chart.screenshot_as_png)  # the chart itself, not just the page around it
    assert link  # the version page's source-run link, checked above
    # through MLflow's client: one point per logged step
    steps = [rec["step"] for rec in _records(proj / "logs" / "metrics-train.jsonl") if "loss" in rec]
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == steps
