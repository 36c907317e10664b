"""The summary of scripts/gpu-validation.sh: reads what the steps left in OUT and writes
OUT/summary.json (schema torchcapsule.gpu-validation/v1) and OUT/summary.md (a row for
docs/gpu-validation.md). Exit 0 when every check passed, 1 otherwise.

    python gpu_validation_summary.py OUT STEPS_TSV MODE NGPU EPOCHS COMMIT MISSING MODEL_DIR
"""
import json, re, subprocess, sys, time
from pathlib import Path

out, steps_file, mode, ngpu, epochs, commit, missing, model_dir = sys.argv[1:9]
out = Path(out)
gpu = mode == "gpu"


def load_json(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as e:
        return {"_error": f"{type(e).__name__}: {e}"}


def text(name):
    try:
        return (out / name).read_text(errors="replace")
    except OSError:
        return ""


steps = {}
for line in Path(steps_file).read_text().splitlines():
    name, rc, secs, note = (line.split("\t") + [""] * 4)[:4]
    steps[name] = {"exit_code": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": float(secs), "note": note}

try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
except Exception:
    smi = []

doc, bench_doc = load_json("doctor.json"), load_json("doctor-bench.json")
s = doc.get("summary") or bench_doc.get("summary") or {}
doctor = {
    "ok": doc.get("ok"), "exit_code": doc.get("exit_code"), "usable_gpus": doc.get("usable_gpus"),
    "torch": s.get("torch"), "torch_cuda": s.get("torch_cuda"), "driver": s.get("driver"),
    "cudnn": s.get("cudnn"), "nccl": s.get("nccl"), "bf16": s.get("bf16"), "device_count": s.get("device_count"),
    "findings": [f"{f.get('severity')}: {f.get('id')}: {f.get('message')}" for f in doc.get("findings", [])],
    "error": doc.get("_error"),
}
bench = []
for b in (bench_doc.get("facts") or {}).get("bench", []):
    r = dict(b)
    if b.get("gemm_tflops") and b.get("peak_tflops"):
        r["gemm_pct_of_peak"] = round(100 * b["gemm_tflops"] / b["peak_tflops"], 1)
    if b.get("mem_gbps") and b.get("peak_gbps"):
        r["mem_pct_of_peak"] = round(100 * b["mem_gbps"] / b["peak_gbps"], 1)
    r["measured"] = all(isinstance(b.get(k), (int, float)) and b[k] > 0 for k in ("gemm_tflops", "mem_gbps"))
    for k in ("gemm_tflops", "mem_gbps"):
        if r.get(k) is not None:
            r[k] = float(f"{r[k]:.4g}")
    bench.append(r)

# training: the rank-0 banner the example prints, and the metrics JSONL
log = text("train.log")
train = {"epochs": int(epochs)}
m = re.search(r"world_size=(\d+) backend=(\S+) device=(\S+) precision=(\S+)", log)
if m:
    train.update(world_size=int(m[1]), backend=m[2], device=m[3], precision=m[4])
m = re.search(r"saved \S+ test_accuracy ([0-9.]+) in ([0-9.]+)s", log)
if m:
    train.update(test_accuracy=float(m[1]), train_loop_seconds=float(m[2]))
records = []
for line in text("metrics-train.jsonl").splitlines():
    try:
        records.append(json.loads(line))
    except ValueError:
        pass
started = [r for r in records if r.get("event") == "started"]
finished = [r for r in records if r.get("event") == "finished"]
if started:
    train["metrics_started"] = {k: started[-1].get(k) for k in ("world_size", "precision")}
if finished:
    train["metrics_test_accuracy"] = finished[-1].get("test_accuracy")
    if started:
        train["metrics_seconds"] = round(finished[-1]["time"] - started[-1]["time"], 1)
train["epochs_logged"] = sum(1 for r in records if "event" not in r)
train["step_seconds"] = steps.get("train", {}).get("seconds")
try:  # the stack as the training rank saw it (train.py records it in meta.json)
    train["model_machine"] = json.loads((Path(model_dir) / "meta.json").read_text()).get("machine")
except (OSError, ValueError):
    train["model_machine"] = None

slog = text("serve.log")
serve = {"step_seconds": steps.get("serve", {}).get("seconds")}
m = re.search(r"smoke test: (\S+) version (\S+) on (\S+), (\d+) requests in (\d+) ms", slog)
if m:
    serve.update(model=m[1], version=m[2], device=m[3].rstrip(","), requests=int(m[4]), ms=int(m[5]))
m = re.search(r"real sklearn digits: (\d+)/(\d+) labelled correctly", slog)
if m:
    serve.update(correct=int(m[1]), of=int(m[2]))
serve["ok"] = "ok: answers have the right labels/shape" in slog
serve["problems"] = re.findall(r"problem: (.*)", slog)

# what the steps should show: on a GPU, NCCL + bf16 + cuda; on the CPU dry run, gloo + fp32 + cpu
want = {"backend": "nccl", "precision": "bf16", "device": "cuda"} if gpu else \
       {"backend": "gloo", "precision": "fp32", "device": "cpu"}
checks = {
    "doctor exit 0": doc.get("exit_code") == 0,
    "bench figures measured": bool(bench) and all(b["measured"] for b in bench),
    "train exit 0": steps.get("train", {}).get("exit_code") == 0,
    f"train backend {want['backend']}": train.get("backend") == want["backend"],
    f"train precision {want['precision']}": train.get("precision") == want["precision"],
    f"train on {want['device']}": str(train.get("device", "")).startswith(want["device"]),
    "train accuracy >= 0.9" if gpu else "train accuracy recorded":
        (train.get("test_accuracy") or 0) >= 0.9 if gpu else train.get("test_accuracy") is not None,
    "serve smoke test ok": serve["ok"] and steps.get("serve", {}).get("exit_code") == 0,
    f"serve on {want['device']}": str(serve.get("device", "")).startswith(want["device"]),
}
if steps.get("image", {}).get("exit_code") != "skipped" and "image" in steps:
    checks["CUDA image: doctor and cuDNN with --gpus all"] = steps["image"]["exit_code"] == 0
status = ("GPU run" if gpu else "no GPU: CPU dry run") + (
    ": all checks passed" if all(checks.values()) else
    f": {sum(not v for v in checks.values())} check(s) failed")

summary = {
    "schema": "torchcapsule.gpu-validation/v1",
    "status": status, "mode": mode, "gpus": int(ngpu),
    "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "commit": commit,
    "nvidia_smi": smi, "missing_modules": missing.split(), "steps": steps, "checks": checks,
    "doctor": doctor, "bench": bench, "train": train, "serve": serve,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def fmt(v, unit=""):
    return "-" if v is None else f"{v}{unit}"


b0 = bench[0] if bench else {}
gpu_name = b0.get("name") or (smi[0].split(",")[0] if smi else "-")
md = [
    f"## {summary['date_utc']} UTC, commit {commit}: {status}",
    "",
    f"- device: {', '.join(smi) if smi else 'no nvidia-smi'}; torch {fmt(doctor['torch'])} "
    f"(CUDA {fmt(doctor['torch_cuda'])}), driver {fmt(doctor['driver'])}, NCCL {fmt(doctor['nccl'])}, "
    f"cuDNN {fmt(doctor['cudnn'])}",
    f"- doctor: exit {fmt(doctor['exit_code'])}; findings: {'; '.join(doctor['findings']) or 'none'}",
    "",
    "| date (UTC) | commit | mode | device | GEMM TFLOP/s, dtype (% peak) | copy GB/s (% peak) "
    "| train backend / precision / world | train acc | train time s (loop / step) "
    "| serve device | serve digits correct | serve ms (requests) | checks |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    f"| {summary['date_utc']} | {commit} | {mode} | {gpu_name} "
    f"| {fmt(b0.get('gemm_tflops'))}, {fmt(b0.get('gemm_dtype'))} ({fmt(b0.get('gemm_pct_of_peak'), '%')}) "
    f"| {fmt(b0.get('mem_gbps'))} ({fmt(b0.get('mem_pct_of_peak'), '%')}) "
    f"| {fmt(train.get('backend'))} / {fmt(train.get('precision'))} / {fmt(train.get('world_size'))} "
    f"| {fmt(train.get('test_accuracy'))} | {fmt(train.get('train_loop_seconds'))} / {fmt(train.get('step_seconds'))} "
    f"| {fmt(serve.get('device'))} | {fmt(serve.get('correct'))}/{fmt(serve.get('of'))} "
    f"| {fmt(serve.get('ms'))} ({fmt(serve.get('requests'))}) "
    f"| {sum(checks.values())}/{len(checks)} |",
    "",
    "Checks: " + "; ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in checks.items()),
    "",
    "Steps: " + "; ".join(f"{k} exit {v['exit_code']} in {v['seconds']}s{(' (' + v['note'] + ')') if v['note'] else ''}"
                          for k, v in steps.items()),
]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if all(checks.values()) else 1)
