"""scripts/gpu-validation.sh: its syntax, and the strings it reads from other parts of the repo.

The script parses the digits example's output (train.py's rank-0 banner, the serve smoke test's
report) and edits a copy of examples/digits/capsule.yaml with sed; these tests fail when one of
those changes under it. tests/integration/test_gpu_validation.py runs it (CPU dry run)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-validation.sh"
SUMMARY = ROOT / "scripts" / "gpu_validation_summary.py"


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_train_banner_it_parses_is_printed_by_the_example():
    src = (ROOT / "examples" / "digits" / "train.py").read_text()
    assert 'f"world_size={info.world_size} backend={info.backend} device={info.device} "' in src
    assert 'f"precision={amp.mode} steps/epoch={steps_per_epoch}"' in src
    assert 'print(f"saved {out} test_accuracy {acc:.4f} in {time.perf_counter() - t0:.1f}s"' in src
    script = SUMMARY.read_text()
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
    written = set(re.findall(r'"\$OUT/([A-Za-z0-9_.-]+)"', SCRIPT.read_text())) \
        | set(re.findall(r'out / "([A-Za-z0-9_.-]+)"', SUMMARY.read_text()))
    assert written <= names, written - names
    assert len(names) <= 8


# Synthetic step outputs in the shapes the real commands print (the numbers are made up for the
# parser, not measurements): a GPU-mode run whose checks all pass, then one whose training fell
# back to gloo/fp32.
_BANNER = "[rank0]:world_size=1 backend={backend} device=cuda:0 precision={precision} steps/epoch=44\n"


def _fake_run(tmp_path: Path, *, backend="nccl", precision="bf16") -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir()
    summary = {"torch": "0.0.0+synthetic", "torch_cuda": "0.0", "driver": "0", "cudnn": "0", "nccl": "0",
               "bf16": True, "device_count": 1}
    doctor = {"ok": True, "exit_code": 0, "usable_gpus": 1, "summary": summary, "findings": []}
    (out / "doctor.json").write_text(json.dumps(doctor))
    bench = {"device": "cuda:0", "name": "Synthetic GPU", "gemm_dtype": "bfloat16", "gemm_n": 8192,
             "gemm_tflops": 100.0, "mem_gbps": 1000.0, "peak_tflops": 200.0, "peak_gbps": 4000.0, "error": None}
    (out / "doctor-bench.json").write_text(json.dumps({**doctor, "facts": {"bench": [bench]}}))
    (out / "train.log").write_text("job local:digits-train-x\n" + _BANNER.format(backend=backend, precision=precision)
                                   + "[rank0]:saved /w/digits/models/digits test_accuracy 0.9700 in 4.2s\n")
    (out / "metrics-train.jsonl").write_text(
        json.dumps({"event": "started", "step": 0, "time": 100.0, "world_size": 1, "precision": precision}) + "\n"
        + json.dumps({"step": 44, "time": 101.0, "epoch": 1, "loss": 0.5, "test_accuracy": 0.9}) + "\n"
        + json.dumps({"event": "finished", "step": 44, "time": 104.5, "test_accuracy": 0.97}) + "\n")
    (out / "serve.log").write_text("smoke test: digits version digits on cuda:0, 8 requests in 12 ms\n"
                                   "  real sklearn digits: 8/8 labelled correctly\n"
                                   "  ok: answers have the right labels/shape, 400 for bad JSON, metrics exported\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("doctor\t0\t3.0\t\ndoctor-bench\t0\t9.0\t\ntrain\t0\t30.0\t\nserve\t0\t15.0\t\n")
    return subprocess.run([sys.executable, str(SUMMARY), str(out), str(steps), "gpu", "1", "30", "abc1234", "",
                           str(tmp_path / "no-model")], capture_output=True, text=True, timeout=60)


def test_summary_of_a_gpu_run(tmp_path):
    r = _fake_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "GPU run: all checks passed"
    assert s["train"]["backend"] == "nccl" and s["train"]["precision"] == "bf16" and s["train"]["world_size"] == 1
    assert s["train"]["test_accuracy"] == 0.97 and s["train"]["metrics_seconds"] == 4.5
    assert s["bench"][0]["gemm_pct_of_peak"] == 50.0 and s["bench"][0]["mem_pct_of_peak"] == 25.0
    assert s["serve"]["device"] == "cuda:0" and (s["serve"]["correct"], s["serve"]["of"]) == (8, 8)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| abc1234 | gpu | Synthetic GPU | 100.0, bfloat16 (50.0%) | 1000.0 (25.0%) | nccl / bf16 / 1 | 0.97 |" in md


def test_summary_flags_a_gpu_run_that_fell_back_to_gloo_fp32(tmp_path):
    r = _fake_run(tmp_path, backend="gloo", precision="fp32")
    assert r.returncode == 1
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["status"] == "GPU run: 2 check(s) failed"
    assert not s["checks"]["train backend nccl"] and not s["checks"]["train precision bf16"]
