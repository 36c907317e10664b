#!/usr/bin/env bash
# One short check of torchcapsule's GPU paths on a real GPU machine (docs/gpu-validation.md).
#
#   scripts/gpu-validation.sh                  # run the check; results in $OUT (default ./gpu-validation-out)
#   scripts/gpu-validation.sh --prepare-wheels # on the HOST: fetch the Python wheels the device image lacks into .whl/
#
# Steps (each with its own timeout; a failed step does not stop the next ones):
#   1. capsule doctor --json            and  capsule doctor --bench --json   (bf16 GEMM TFLOP/s, copy GB/s vs peak)
#   2. capsule run train (local backend) of examples/digits: DDP under torchrun, one rank per GPU
#      (NCCL and bf16 autocast are what the runtime picks on a GPU: train/dist.py, train/amp.py)
#   3. capsule serve <the model it trained> --device cuda --smoke-test
#   4. the built CUDA image (CAPSULE_IMAGE=<tag>, e.g. digits:2.13.0-cu130-py3.11-slim): inside
#      `docker run --gpus all`, capsule doctor --require-gpus N and a cuDNN conv + NCCL version check;
#      skipped, saying why, without that variable, a Docker engine or a GPU
#   5. summary.json + summary.md (a row for docs/gpu-validation.md)
#
# Without a GPU it runs the same steps on the CPU ("no GPU: CPU dry run": gloo, fp32, --device cpu,
# 2 epochs) so that the script itself can be checked anywhere; REQUIRE_GPU=1 makes that exit 3.
#
# $OUT receives at most 8 files (the device tool returns no more): run.log, doctor.json,
# doctor-bench.json, train.log, metrics-train.jsonl, serve.log, summary.json, summary.md.
#
# Environment: OUT, PYTHON (default python3), REQUIRE_GPU=1, GIT_COMMIT (recorded in the summary), EPOCHS (default 30 on GPU, 2 on CPU),
# BUDGET_S (whole-run limit in seconds, default 420), KEEP_WORK=1 (keep the scratch directory),
# CAPSULE_IMAGE (a built CUDA image to check inside, step 4).
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
# Packages torchcapsule's doctor/train/serve paths import that the device image ('cuda', see
# /work/.library/device/KINDS.md) does not list: pydantic (config), fastapi + uvicorn + httptools +
# msgspec (serve), and what they need at the versions they need.
WHEEL_PKGS="pydantic pydantic_core annotated-types typing-inspection typing_extensions fastapi starlette opentelemetry-api uvicorn httptools msgspec"
REQUIRED_MODULES="click rich yaml packaging jinja2 pydantic numpy safetensors sklearn fastapi uvicorn httptools uvloop msgspec httpx prometheus_client"

# ------------------------------------------------------------------ host side: --prepare-wheels
if [ "${1:-}" = "--prepare-wheels" ]; then
  # Same versions as this checkout's environment ($PY), built for the device's CPython 3.12 on x86-64.
  dest="$REPO/.whl"
  mkdir -p "$dest"
  specs=$("$PY" - $WHEEL_PKGS <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed in {sys.executable}: cannot pin its version")
print(" ".join(out))
EOF
) || exit 1
  echo "fetching into $dest: $specs"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" $specs || exit 1
  ls -l "$dest"
  du -sh "$dest"
  exit 0
fi

# ------------------------------------------------------------------ the check
OUT=${OUT:-$REPO/gpu-validation-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "cannot create OUT=$OUT" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-validation.XXXXXX") || exit 2
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
T_START=$(date +%s)
BUDGET_S=${BUDGET_S:-420}
STEPS="$WORK/steps.tsv"
: >"$STEPS"

say() { printf '\n=== %s [%ss]\n' "$*" "$(( $(date +%s) - T_START ))"; }

cleanup() {
  local rc=$?
  cancel_jobs
  [ "${KEEP_WORK:-0}" = 1 ] && echo "scratch kept: $WORK" || rm -rf "$WORK"
  exec >&- 2>&-           # let tee see EOF and finish run.log before the script's caller collects $OUT
  wait "$TEE_PID" 2>/dev/null
  exit "$rc"
}

# record NAME RC SECONDS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$STEPS"; }

# run_step NAME TIMEOUT_S STDOUT_FILE CMD... : stdout to STDOUT_FILE (also echoed when it is a log), stderr to run.log
run_step() {
  local name=$1 limit=$2 dest=$3; shift 3
  local left=$(( BUDGET_S - ($(date +%s) - T_START) ))
  if [ "$left" -lt 15 ]; then
    echo "skipped $name: the run's budget (BUDGET_S=$BUDGET_S) is spent"
    record "$name" skipped 0 "budget spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (timeout ${limit}s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  case "$dest" in
    *.json) timeout -k 10 "$limit" "$@" >"$dest"; rc=$? ;;
    *)      timeout -k 10 "$limit" "$@" 2>&1 | tee "$dest"; rc=${PIPESTATUS[0]} ;;
  esac
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${limit}s"
  echo "--- $name: exit $rc in ${secs}s ${note}"
  record "$name" "$rc" "$secs" "$note"
  return "$rc"
}

# Local jobs run under a detached supervisor (its own session): a timed-out `capsule run`
# leaves its ranks running, so cancel whatever is still running in this run's CAPSULE_HOME.
cancel_jobs() {
  [ -d "${CAPSULE_HOME:-/nonexistent}/jobs" ] || return 0
  local ids
  ids=$(timeout 30 capsule jobs list --on local --json 2>/dev/null | "$PY" -c '
import json, sys
try:
    jobs = json.load(sys.stdin)["jobs"]
except Exception:
    jobs = []
print(" ".join(j["job_id"] for j in jobs if j.get("state") in ("PENDING", "RUNNING")))')
  [ -z "$ids" ] && return 0
  for id in $ids; do
    echo "cancelling leftover job $id"
    timeout 30 capsule jobs cancel "$id" || true
  done
  for _ in $(seq 1 40); do  # CANCEL_GRACE_S is 30 s
    sleep 1
    [ -z "$(timeout 30 capsule jobs list --on local --json 2>/dev/null | "$PY" -c '
import json, sys
print(" ".join(j["job_id"] for j in json.load(sys.stdin)["jobs"] if j.get("state") in ("PENDING", "RUNNING")))')" ] && break
  done
}
trap cleanup EXIT

say "gpu-validation: repo $REPO, out $OUT, scratch $WORK"
date -u
uname -a
command -v "$PY" >/dev/null || { echo "no $PY on PATH: set PYTHON=/path/to/python3 (one with torch)"; exit 2; }
PY=$(command -v "$PY")
echo "python: $PY ($("$PY" -V 2>&1))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
else
  echo "nvidia-smi: not on PATH"
fi

# -- preflight: torch, the GPU, and the packages torchcapsule needs ----------------------------
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "FATAL: $PY cannot import torch; on the device machine the image's python3 holds it"
  exit 2
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -gt 0 ]; then
  MODE=gpu; DEVICE=cuda; GPUS=$NGPU; EPOCHS=${EPOCHS:-30}
  echo "GPU mode: $NGPU CUDA device(s); training runs $NGPU rank(s) with NCCL, serving on cuda"
  if [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && ! command -v nvidia-smi >/dev/null; then
    # the local backend counts GPUs with `nvidia-smi -L` or CUDA_VISIBLE_DEVICES
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NGPU - 1))); export CUDA_VISIBLE_DEVICES
    echo "no nvidia-smi: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES for the local backend's GPU count"
  fi
else
  MODE=cpu; DEVICE=cpu; GPUS=0; EPOCHS=${EPOCHS:-2}
  echo "NOTE: no GPU: CPU dry run (torch sees no CUDA device): gloo, fp32, --device cpu, $EPOCHS epochs."
  echo "      The figures below check the script, not the GPU paths."
fi

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - $REQUIRED_MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing Python modules: $missing"
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    echo "installing the carried wheels from .whl/ into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$REPO"/.whl/*.whl || echo "WARNING: installing .whl/ failed"
    export PYTHONPATH="$REPO/src:$WORK/site${PYTHONPATH#"$REPO/src"}"
    missing=$("$PY" - $REQUIRED_MODULES <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
)
    [ -n "$missing" ] && echo "still missing after the wheels: $missing"
  else
    echo "no .whl/ to install from: run 'scripts/gpu-validation.sh --prepare-wheels' on the host and carry .whl"
  fi
fi
[ -z "$missing" ] && echo "all required modules import"
"$PY" -c 'import torchcapsule, sys; print("torchcapsule from", torchcapsule.__file__)' || true

# `capsule` = this checkout's CLI under this interpreter (no install needed, nothing built).
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec "%s" -m torchcapsule.cli.main "$@"\n' "$PY" >"$WORK/bin/capsule"
chmod +x "$WORK/bin/capsule"
export PATH="$WORK/bin:$PATH"
export CAPSULE_HOME="$WORK/capsule-home"   # local jobs' state, away from ~/.capsule
export PYTHONUNBUFFERED=1
cd "$WORK" || exit 2                        # no capsule.yaml here: doctor compares no pins

# -- 1. doctor ------------------------------------------------------------------------------------
run_step doctor 90 "$OUT/doctor.json" capsule doctor --json --require-gpus "$GPUS"
run_step doctor-bench 150 "$OUT/doctor-bench.json" capsule doctor --bench --json

# -- 2. training: the digits example under the local backend --------------------------------------
mkdir -p "$WORK/digits"
(cd "$REPO/examples/digits" && tar cf - --exclude=./models --exclude=./logs --exclude=./data \
  --exclude=./.capsule --exclude=__pycache__ .) | (cd "$WORK/digits" && tar xf -)
# Only the epochs (30 in the example; fewer on a CPU dry run) and no restarts (a failure should show, not retry).
sed -i -e "s/^\(    run: train.py --epochs\) [0-9][0-9]*\$/\1 $EPOCHS/" -e 's/^\(    retries:\) [0-9][0-9]*$/\1 0/' \
  "$WORK/digits/capsule.yaml"
grep -n "run: train.py\|retries:" "$WORK/digits/capsule.yaml"
(cd "$WORK/digits" && run_step train 240 "$OUT/train.log" capsule run train --on local --gpus "$GPUS")
cancel_jobs
cp "$WORK/digits/logs/metrics-train.jsonl" "$OUT/metrics-train.jsonl" 2>/dev/null \
  || echo "no metrics file at $WORK/digits/logs/metrics-train.jsonl"

# -- 3. serving the trained model -----------------------------------------------------------------
MODEL_DIR="$WORK/digits/models/digits"
if [ -f "$MODEL_DIR/meta.json" ]; then
  run_step serve 120 "$OUT/serve.log" capsule serve "$MODEL_DIR" --device "$DEVICE" --smoke-test
else
  echo "skipped serve: training left no model directory at $MODEL_DIR" | tee "$OUT/serve.log"
  record serve skipped 0 "no model directory"
fi

# -- 4. inside the built CUDA image ----------------------------------------------------------------
# What a GPU-less build machine cannot prove (tests/integration/test_image_cuda.py proves the rest):
# the image's own torch sees the GPUs through the NVIDIA container runtime, and cuDNN runs.
IMAGE_CHECK='capsule doctor --json --require-gpus "$1" > /tmp/doctor.json; rc=$?
python -c "import json; r = json.load(open(\"/tmp/doctor.json\")); print(\"image doctor:\", r[\"summary\"], [f[\"id\"] for f in r[\"findings\"]])"
python -c "import torch; x = torch.randn(2, 3, 16, 16, device=\"cuda\"); torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=\"cuda\")); print(\"image cudnn conv ok\", torch.backends.cudnn.version(), \"nccl\", torch.cuda.nccl.version())" || rc=1
exit $rc'
if [ -z "${CAPSULE_IMAGE:-}" ]; then
  echo "skipped image: no CAPSULE_IMAGE=<tag of a built CUDA image> given" | tee "$WORK/image.log"
  record image skipped 0 "no CAPSULE_IMAGE"
elif ! command -v docker >/dev/null || ! timeout 30 docker info >/dev/null 2>&1; then
  echo "skipped image: no Docker engine answers on this machine, so $CAPSULE_IMAGE cannot be run" | tee "$WORK/image.log"
  record image skipped 0 "no Docker engine"
elif [ "$MODE" != gpu ]; then
  echo "skipped image: no GPU here, so $CAPSULE_IMAGE cannot be checked with one" | tee "$WORK/image.log"
  record image skipped 0 "no GPU"
else
  run_step image 240 "$WORK/image.log" docker run --rm --gpus all --ipc=host "$CAPSULE_IMAGE" \
    bash -c "$IMAGE_CHECK" image-check "$GPUS"
fi

# -- 5. summary -----------------------------------------------------------------------------------
say "summary"
# The device machine gets a copy of the tree, maybe without .git: pass GIT_COMMIT=<hash> there.
GIT_COMMIT=${GIT_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}
"$PY" "$REPO/scripts/gpu_validation_summary.py" "$OUT" "$STEPS" "$MODE" "$NGPU" "$EPOCHS" "$GIT_COMMIT" "${missing:-}" "$MODEL_DIR"
rc=$?
echo
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "total $(( $(date +%s) - T_START ))s"
if [ "$MODE" = cpu ]; then
  echo "NOTE: no GPU: CPU dry run. Nothing above measures a GPU."
  if [ "${REQUIRE_GPU:-0}" = 1 ]; then
    echo "REQUIRE_GPU=1 and no GPU is visible: exit 3"
    exit 3
  fi
fi
exit $rc
