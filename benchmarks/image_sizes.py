"""Image sizes: capsule's slim and jupyter-ssh images vs a naive single-stage Dockerfile that
installs the same packages (the jupyter-ssh set) from the same wheelhouse, all in one run.

    python benchmarks/image_sizes.py [--base local/debian:bookworm] [--project examples/digits]

Builds what is missing with the real Docker engine (capsule images via `capsule image build`'s
code path; the naive one with `docker build` on the same context), then prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from torchcapsule.config import load_project  # noqa: E402
from torchcapsule.image import build as b  # noqa: E402
from torchcapsule.image import render  # noqa: E402
from torchcapsule.image.spec import resolve  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", default=str(REPO / "examples" / "digits"))
    ap.add_argument("--base", default="local/debian:bookworm")
    ap.add_argument("--rebuild", action="store_true", help="build even when the tag exists")
    args = ap.parse_args()
    project = load_project(args.project)
    b.require_engine()
    rows = []
    for flavor in ("slim", "jupyter-ssh"):
        spec = resolve(project, flavor=flavor, base=args.base)
        t = None
        if args.rebuild or b.docker("image", "inspect", spec.tag, check=False).returncode != 0:
            t = b.build(spec, project.root, on_status=lambda s: print(f"  {s}", file=sys.stderr)).seconds
        rows.append((f"capsule {flavor} (multi-stage)", spec.tag, b.image_size(spec.tag), t))

    spec = resolve(project, flavor="jupyter-ssh", base=args.base)
    naive_tag = f"{project.name}-naive:{spec.torch}-{spec.cuda_tag}-py{spec.python}"
    t = None
    if args.rebuild or b.docker("image", "inspect", naive_tag, check=False).returncode != 0:
        ctx, _ = b.prepare_context(spec, project.root, torch_index=None, python_full=b.base_python(spec))
        (ctx / "Dockerfile.naive").write_text(render.naive_dockerfile(spec))
        t0 = time.monotonic()
        print(f"  docker build {naive_tag} (naive single stage)", file=sys.stderr)
        b.docker_build(ctx, naive_tag, {}, dockerfile="Dockerfile.naive", log_path=ctx / "build-naive.log")
        t = time.monotonic() - t0
    rows.append(("naive single-stage, same packages", naive_tag, b.image_size(naive_tag), t))

    print("| image | tag | size (docker image inspect .Size) | build time this run |")
    print("|---|---|---|---|")
    for name, tag, size, secs in rows:
        bt = f"{secs:.0f} s" if secs is not None else "already built"
        print(f"| {name} | `{tag}` | {size / 1e9:.2f} GB ({size:,} B) | {bt} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
