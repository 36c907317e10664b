"""Image sizes: capsule's slim and jupyter-ssh images vs a naive single-stage Dockerfile that
installs the same packages (the jupyter-ssh set) from the same wheelhouse, all in one run.

    python benchmarks/image_sizes.py [--base local/debian:bookworm] [--project examples/digits]
    python benchmarks/image_sizes.py --cuda 13.0     # the CUDA images (PyPI's torch), plus the floor

Builds what is missing with the real Docker engine (capsule images via `capsule image build`'s
code path; the naive one with `docker build` on the same context), then prints a Markdown table.
With --cuda, the project is a copy of the example pinned to that CUDA (kept under
~/.cache/torchcapsule/bench/, locked once), and the table adds the floor: the base image plus
the unpacked torch, triton, nvidia-* and cuda-* wheels, nothing else, measured inside the slim
image, and a breakdown of where the slim image's bytes above the floor go.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from torchcapsule.config import load_project  # noqa: E402
from torchcapsule.image import build as b  # noqa: E402
from torchcapsule.image import lock as lockmod  # noqa: E402
from torchcapsule.image import render  # noqa: E402
from torchcapsule.image.spec import resolve  # noqa: E402
from torchcapsule.image.wheelhouse import Target  # noqa: E402

# jupyter/docker-stacks, quay.io/jupyter/pytorch-notebook, as published (compressed sizes are
# smaller; these are the unpacked sizes the issue quotes): the peer for a PyTorch+Jupyter image.
REFERENCES = [("jupyter/docker-stacks pytorch-notebook:cuda12 (reference)", 8.82e9),
              ("jupyter/docker-stacks pytorch-notebook CPU (reference)", 4.33e9)]
# What "the torch + CUDA wheels" are inside the venv (the floor).
FLOOR_DISTS = r"^(torch|triton|nvidia-.*|cuda-.*)$"
# Bytes of the installed files of each distribution in the image's venv, by group.
SIZES_PY = f"""
import json, re, importlib.metadata as md
out = {{}}
for d in md.distributions():
    n = d.metadata["Name"].lower().replace("_", "-")
    size = 0
    for f in d.files or []:
        p = d.locate_file(f)
        try:
            size += p.stat().st_size
        except OSError:
            pass
    out[n] = size
print(json.dumps(out))
"""


def cuda_project(cuda: str, base: str) -> Path:
    """examples/digits pinned to `cuda`, locked (once) for the base's Python."""
    dest = Path.home() / ".cache" / "torchcapsule" / "bench" / f"digits-cuda{cuda}"
    shutil.copytree(REPO / "examples" / "digits", dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".capsule", "capsule.lock", "capsule.dev.lock", "data", "models", "logs", "mlruns", "__pycache__"))
    yaml = dest / "capsule.yaml"
    yaml.write_text(re.sub(r"(?m)^(  cuda:) \S+", rf'\1 "{cuda}"', yaml.read_text(), count=1))
    spec = resolve(load_project(dest), base=base)
    target = Target(b.base_python(spec))
    lock_text = (dest / lockmod.LOCK).read_text() if (dest / lockmod.LOCK).is_file() else ""
    if lockmod.parse_lock(lock_text)[0] != lockmod.inputs_hash(spec, target):
        print(f"  locking {dest}", file=sys.stderr)
        lockmod.lock(spec, target, dest, torch_index=spec.torch_index_for(None))
    return dest


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=str(REPO / "examples" / "digits"))
    ap.add_argument("--base", default="local/debian:bookworm")
    ap.add_argument("--cuda", default=None, help="measure the CUDA images of this CUDA (e.g. 13.0)")
    ap.add_argument("--rebuild", action="store_true", help="build even when the tag exists")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive single-stage image")
    args = ap.parse_args()
    b.require_engine()
    root = cuda_project(args.cuda, args.base) if args.cuda else Path(args.project)
    project = load_project(root)
    rows = []
    for flavor in ("slim", "jupyter-ssh"):
        spec = resolve(project, flavor=flavor, base=args.base)
        t = None
        if args.rebuild or b.docker("image", "inspect", spec.tag, check=False).returncode != 0:
            t = b.build(spec, project.root, torch_index=spec.torch_index_for(None),
                        on_status=lambda s: print(f"  {s}", file=sys.stderr)).seconds
        rows.append((f"capsule {flavor} (multi-stage)", spec.tag, b.image_size(spec.tag), t))

    spec = resolve(project, flavor="jupyter-ssh", base=args.base)
    naive_tag = f"{project.name}-naive:{spec.torch}-{spec.cuda_tag}-py{spec.python}"
    if not args.no_naive:
        t = None
        if args.rebuild or b.docker("image", "inspect", naive_tag, check=False).returncode != 0:
            ctx, _ = b.prepare_context(spec, project.root, torch_index=spec.torch_index_for(None),
                                       python_full=b.base_python(spec))
            (ctx / "Dockerfile.naive").write_text(render.naive_dockerfile(spec))
            t0 = time.monotonic()
            print(f"  docker build {naive_tag} (naive single stage)", file=sys.stderr)
            b.docker_build(ctx, naive_tag, {}, dockerfile="Dockerfile.naive", log_path=ctx / "build-naive.log")
            t = time.monotonic() - t0
        rows.append(("naive single-stage, same packages as jupyter-ssh", naive_tag, b.image_size(naive_tag), t))

    slim_tag, slim_size = rows[0][1], rows[0][2]
    floor = None
    if spec.is_cuda:
        sizes = json.loads(b.docker("run", "--rm", "--network", "none", "--entrypoint", "/opt/venv/bin/python",
                                    slim_tag, "-c", SIZES_PY, timeout=300).stdout)
        wheels = sum(v for k, v in sizes.items() if re.match(FLOOR_DISTS, k))
        base_size = b.image_size(args.base)
        floor = base_size + wheels
        rows.append((f"floor: {args.base} + unpacked torch/triton/nvidia-*/cuda-* wheels", "-", floor, None))
        rows += [(name, "-", int(size), None) for name, size in REFERENCES]

    print("| image | tag | size (docker image inspect .Size) | build time this run |")
    print("|---|---|---|---|")
    for name, tag, size, secs in rows:
        bt = f"{secs:.0f} s" if secs is not None else ("already built" if tag != "-" else "-")
        print(f"| {name} | {'`' + tag + '`' if tag != '-' else '-'} | {gb(size)} ({size:,} B) | {bt} |")

    if floor is not None:
        ref = REFERENCES[0][1]
        print(f"\nslim / floor = {slim_size / floor:.3f}x (target <= 1.15x); "
              f"slim / docker-stacks cuda12 = {slim_size / ref:.3f}x (target <= 0.70x)")
        others = sorted(((k, v) for k, v in sizes.items() if not re.match(FLOOR_DISTS, k)), key=lambda kv: -kv[1])
        print(f"\nAbove the floor in the slim image ({gb(slim_size - floor)}):")
        print(f"- other Python packages in the venv: {gb(sum(v for _, v in others))} "
              f"(largest: {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in others[:6])})")
        fmt = "{{.Size}}\t{{.CreatedBy}}"
        hist = b.docker("history", "--no-trunc", "--format", fmt, slim_tag).stdout.splitlines()
        own = len(hist) - len(b.docker("history", "--format", fmt, args.base).stdout.splitlines())
        for line in hist[:own]:  # the layers above the base, newest first
            size, cmd = line.split("\t", 1)
            if size not in ("0B", "0"):
                cmd = re.sub(r"\s+", " ", cmd)[:150]
                print(f"- layer {size}: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
