"""`capsule image push` figures against a fresh local registry (Debian's docker-registry, started
here on 127.0.0.1 with empty storage, so the first push really uploads everything): time and bytes of the first push of a project image, then of a second push after a one-line change
in the image's code (a new top layer; every other layer is reused).

    .venv/bin/python benchmarks/image_push.py [--image digits:2.13.0-cpu-py3.11-slim]

Bytes are what the registry stored (growth of its storage directory), not Docker's estimate.
Needs the docker-registry binary (scripts/install-system.sh) and a Docker engine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from torchcapsule._util import free_port  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def docker(*args: str) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def push(proj: Path, registry: str, store: Path) -> dict:
    before = du(store)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torchcapsule.cli.main", "image", "push", "--registry", registry,
                        "--json"], cwd=proj, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    out = json.loads(r.stdout)
    return {"wall_s": wall, "bytes": du(store) - before, "pushed": out["layers_pushed"],
            "reused": out["layers_reused"], "pinned": out["pinned"]}


def start_registry(tmp: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    store = tmp / "storage"
    store.mkdir()
    conf = tmp / "registry.yml"
    conf.write_text(f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {store}}}}}\n"
                    f"http: {{addr: 127.0.0.1:{port}}}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(300):  # until it answers (or died)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5)
            return proc, f"127.0.0.1:{port}/bench", store
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("docker-registry exited; is it installed (scripts/install-system.sh)?")
            time.sleep(0.2)
    raise SystemExit("docker-registry did not answer")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="digits:2.13.0-cpu-py3.11-slim", help="a built project image to push")
    args = ap.parse_args()
    labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", args.image))
    flavor = labels.get("io.torchcapsule.flavor", "slim")
    name = f"pushbench{uuid.uuid4().hex[:6]}"
    torch, python = labels.get("io.torchcapsule.torch", "2.13.0"), labels.get("io.torchcapsule.python", "3.11")
    tag = f"{name}:{torch}-cpu-py{python}-{flavor}"  # the project's semantic tag (tags.format_tag)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", args.image))
    with tempfile.TemporaryDirectory() as tmp:
        reg_proc, registry, store = start_registry(Path(tmp))
        proj = Path(tmp) / "proj"
        proj.mkdir()
        (proj / "capsule.yaml").write_text(
            f"name: {name}\nimage: {{torch: '{torch}', cuda: cpu, python: '{python}', flavor: {flavor}}}\n")
        docker("tag", args.image, tag)
        try:
            first = push(proj, registry, store)
            # A one-line change to code inside the image: one new layer on top.
            ctx = proj / "ctx"
            ctx.mkdir()
            (ctx / "Dockerfile").write_text(
                f"FROM {args.image}\nUSER root\n"
                f"RUN echo '# one-line change {uuid.uuid4().hex}' >> /opt/venv/changed.py\n")
            docker("build", "-q", "-t", tag, str(ctx))
            second = push(proj, registry, store)
        finally:
            refs = [r for r in docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").split() if name in r]
            subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True)
            reg_proc.terminate()
            reg_proc.wait(timeout=30)
    print(f"image {args.image}: {size / 1e9:.2f} GB uncompressed, pushed to a fresh registry with `capsule image push`")
    for what, f in (("first push", first), ("after a one-line change", second)):
        print(f"{what:<26} {f['wall_s']:6.1f} s  {f['bytes'] / 1e6:9.2f} MB stored  "
              f"layers uploaded {f['pushed']}, reused {f['reused']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
