"""`capsule doctor`: verify the environment it runs in. Exit 0 ok, 1 a check failed, 2 usage."""
from __future__ import annotations

import click

from ..errors import ConfigError
from ._common import console, file_option, json_option, print_json


def _gpu_count(text: str) -> int:
    t = text.strip()
    if not t.isdigit():
        raise ConfigError(f"--require-gpus: '{text}' is not a GPU count; use a whole number >= 0, e.g. --require-gpus 1")
    return int(t)


def _pins(file: str | None) -> tuple[dict[str, str] | None, str | None]:
    """The project's pins when -f is given or a capsule.yaml is found; an invalid file is an error."""
    from ..config import find_project_file, load_project

    if file is None:
        try:
            path = find_project_file(None)
        except ConfigError:
            return None, None  # no project here: nothing to compare with
    else:
        path = find_project_file(file)
    img = load_project(path).image
    return {"torch": img.torch, "cuda": img.cuda, "python": img.python}, str(path)


@click.command()
@file_option
@json_option
@click.option("--require-gpus", "require_gpus", default="0", metavar="N",
              help="Fail (exit 1) unless N usable CUDA devices are present.")
@click.option("--bench", is_flag=True, help="Also measure bf16 GEMM TFLOP/s and memory bandwidth per device.")
@click.pass_context
def doctor(ctx: click.Context, file: str | None, as_json: bool, require_gpus: str, bench: bool) -> None:
    """Verify this environment: torch, CUDA, driver, GPUs, NCCL, /dev/shm; diagnose what is wrong."""
    from ..doctor import bench as bench_mod
    from ..doctor.diagnose import diagnose, exit_code
    from ..doctor.probes import probe
    from ..doctor.report import render_text, to_json

    n = _gpu_count(require_gpus)
    pinned, project_file = _pins(file)
    facts = probe(pinned=pinned, project_file=project_file)
    facts.smoke = bench_mod.smoke(facts)
    if bench:
        facts.bench = bench_mod.bench(facts)
    findings = diagnose(facts, require_gpus=n)
    if as_json:
        print_json(to_json(facts, findings, require_gpus=n))
    else:
        render_text(console(), facts, findings, require_gpus=n)
    ctx.exit(exit_code(findings))
