"""Registry speed: `capsule models list` and `register` on an existing SQLite store, against the
plain MLflow client doing the same work, in the same run. Every figure is the wall time of a
fresh process (as a user or a pipeline stage runs it), so imports count.

    PYTHONPATH=src python benchmarks/registry_bench.py [--repeat 5]

Prints one line per measurement: median and min over the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.integration._registry_model import train_model_dir, write_project  # noqa: E402

PLAIN_LIST = """
from mlflow import MlflowClient
c = MlflowClient({uri!r}, {uri!r})
for m in c.search_registered_models():
    print(m.name, max(int(v.version) for v in m.latest_versions), dict(m.aliases))
"""

# What `capsule models register` does, written directly against MLflow: one run with params,
# metrics and tags, the same models-from-code pyfunc and artifacts, one new model version.
PLAIN_REGISTER = """
import json, mlflow, warnings
warnings.simplefilter("ignore")
mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})
d = {model!r}
meta = json.load(open(d + "/meta.json"))
exp = mlflow.get_experiment_by_name("digits").experiment_id
with mlflow.start_run(experiment_id=exp) as run:
    mlflow.log_params(meta["params"]); mlflow.log_metrics(meta["metrics"])
    info = mlflow.pyfunc.log_model(name="model", python_model={code!r},
        artifacts={{"weights": d + "/model.safetensors", "model_code": d + "/model.py", "meta": d + "/meta.json"}},
        pip_requirements=["mlflow", "torch", "numpy"])
mv = mlflow.register_model(info.model_uri, "digits")
print(mv.version)
"""


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{r.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": ""}
    capsule = [sys.executable, "-m", "torchcapsule.cli.main"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "proj"
        write_project(root)
        model = train_model_dir(root / "models" / "digits", steps=20)
        uri = f"sqlite:///{root}/.capsule/mlflow.db"
        code = str(REPO / "src" / "torchcapsule" / "registry" / "pyfunc_model.py")

        timed([*capsule, "models", "register", "--no-promote"], env, root)  # the existing store
        fresh: list[float] = []
        fresh_plain: list[float] = []
        rows: list[tuple[str, list[float]]] = [
            ("capsule models register, fresh store (includes migrations)", fresh),
            ("plain MLflow client: first use of a fresh store (migrations only)", fresh_plain),
        ]
        cases = {
            "capsule models list": ([*capsule, "models", "list"], env),
            "capsule models list, MLflow client path (CAPSULE_REGISTRY_FAST=0)":
                ([*capsule, "models", "list"], {**env, "CAPSULE_REGISTRY_FAST": "0"}),
            "plain MLflow client: search_registered_models":
                ([sys.executable, "-c", PLAIN_LIST.format(uri=uri)], env),
            "capsule models register --no-promote (existing store)":
                ([*capsule, "models", "register", "--no-promote"], env),
            "plain MLflow: run + pyfunc.log_model + register_model":
                ([sys.executable, "-c", PLAIN_REGISTER.format(uri=uri, model=str(model), code=code)], env),
            "python -c 'import mlflow' (floor of any MLflow call)":
                ([sys.executable, "-c", "import mlflow"], env),
        }
        for name in cases:
            rows.append((name, []))
        for _ in range(args.repeat):  # interleaved, so load changes on the machine hit all cases alike
            for i, (name, (cmd, e)) in enumerate(cases.items(), start=2):
                rows[i][1].append(timed(cmd, e, root))
            other = Path(tempfile.mkdtemp(dir=tmp)) / "proj"
            write_project(other)
            (other / "models").mkdir()
            (other / "models" / "digits").symlink_to(model)
            fresh.append(timed([*capsule, "models", "register", "--no-promote"], env, other))
            db = f"sqlite:///{other}/plain.db"
            fresh_plain.append(timed([sys.executable, "-c", f"from mlflow import MlflowClient; "
                                      f"MlflowClient({db!r}, {db!r}).search_registered_models()"], env, other))
        n = subprocess.run([*capsule, "models", "list", "digits", "--json"], env=env, cwd=root,
                           capture_output=True, text=True).stdout.count('"version"')
    print(f"registry benchmark: {args.repeat} repeats, fresh process each, store ends with {n} versions")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; wall seconds")
    print(f"{'case':<72} {'median':>8} {'min':>8}")
    for name, times in rows:
        print(f"{name:<72} {statistics.median(times):8.2f} {min(times):8.2f}")


if __name__ == "__main__":
    main()
