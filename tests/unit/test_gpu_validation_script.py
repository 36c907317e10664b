"""scripts/gpu-validation.sh: its syntax, and the strings it reads from other parts of the repo.

The script parses the digits example's output (train.py's rank-0 banner, the serve smoke test's
report) and edits a copy of examples/digits/capsule.yaml with sed; these tests fail when one of
those changes under it. tests/integration/test_gpu_validation.py runs it (CPU dry run)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-validation.sh"


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_train_banner_it_parses_is_printed_by_the_example():
    src = (ROOT / "examples" / "digits" / "train.py").read_text()
    assert 'f"world_size={info.world_size} backend={info.backend} device={info.device} "' in src
    assert 'f"precision={amp.mode} steps/epoch={steps_per_epoch}"' in src
    assert 'print(f"saved {out} test_accuracy {acc:.4f} in {time.perf_counter() - t0:.1f}s"' in src
    script = SCRIPT.read_text()
    assert r"world_size=(\d+) backend=(\S+) device=(\S+) precision=(\S+)" in script
    assert r"saved \S+ test_accuracy ([0-9.]+) in ([0-9.]+)s" in script


def test_smoke_report_it_parses_is_printed_by_serve():
    src = (ROOT / "src" / "torchcapsule" / "serve" / "smoke.py").read_text()
    assert "smoke test: {model['name']} version {model['version']} on {model['device']}, " in src
    assert "{len(reqs)} requests in {elapsed * 1000:.0f} ms" in src
    assert "real sklearn digits: {correct}/{len(reqs)} labelled correctly" in src
    assert "ok[/green]: answers have the right labels/shape" in src


def test_sed_edits_match_the_example_yaml():
    yaml = (ROOT / "examples" / "digits" / "capsule.yaml").read_text()
    assert re.search(r"^    run: train\.py --epochs [0-9]+$", yaml, re.M)
    assert len(re.findall(r"^    retries: [0-9]+$", yaml, re.M)) == 1  # only the train stage's


def test_out_holds_at_most_eight_files():
    """The device tool returns at most 8 files from $OUT."""
    names = {"run.log", "doctor.json", "doctor-bench.json", "train.log", "metrics-train.jsonl",
             "serve.log", "summary.json", "summary.md"}
    script = SCRIPT.read_text()
    written = set(re.findall(r'"\$OUT/([A-Za-z0-9_.-]+)"', script)) | set(re.findall(r'out / "([A-Za-z0-9_.-]+)"', script))
    assert written <= names, written - names
    assert len(names) <= 8
