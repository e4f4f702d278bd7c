#!/usr/bin/env bash
# GPU acceptance run of diffrl: the GPU tests, a short training run, and three GPU benchmarks, each step timed and
# recorded (pass/fail, seconds, key numbers) in OUTDIR/acceptance.json and OUTDIR/acceptance.md. A failed step is
# recorded and the next one runs. The last line on stdout is one JSON line: {"ok": true|false, ..., "steps": {...}}.
#
#   bash scripts/gpu_acceptance.sh --build-wheels      # on the CPU machine (PyPI reachable): fill .whl/ for the GPU
#   bash scripts/gpu_acceptance.sh OUTDIR              # on the GPU machine (no network): install .whl/, run the steps
#   bash scripts/gpu_acceptance.sh --dry-run [OUTDIR]  # on a CPU (CI): the same steps' CPU logic at tiny settings
#
# GPU mode is sized for 8 minutes on one H100 (ACCEPT_BUDGET_S, default 460 s, caps the whole run: a step gets at
# most its own limit and what is left of the budget). The GPU image has Python 3.12 and torch but not diffusers,
# open_clip (nor their few missing dependencies) or torchao: they and diffrl itself travel as wheels in .whl/ and are
# installed with pip --target into $ACCEPT_SITE (default /tmp/site), then put on PYTHONPATH after the checkout.
# Steps: install (GPU only), environment, gpu_tests, train, bench_throughput, bench_explore, bench_families.
# bench_throughput (scripts/bench_throughput.py) measures compiled (model.compile=true: regional torch.compile) against
# eager on the GPU, on the embedded tiny model: the rollout and the clipped-ratio and DiffusionNFT updates (the first
# call, compile time, is reported apart as warmup_s); it takes up to 120 s of the budget. The per-family comparison
# at full size, compiled against eager, is not in the budget: bench_families runs eagerly, last, in the rest of it;
# with a budget to spare, ACCEPT_FAMILIES_ARGS="--batch 2 --steps 4 --trained 2 --repeats 1 --checkpointing --compile"
# adds it (each model timed eager, then compiled in place as model.compile does: speedup, warm-up, output difference).
# Python: $PYTHON, else python3 (dry-run: also the repo's .venv when python3 lacks diffrl).
# Knobs (environment): ACCEPT_BUDGET_S; ACCEPT_THROUGHPUT_ARGS, ACCEPT_EXPLORE_ARGS, ACCEPT_FAMILIES_ARGS (replace
# the benchmark flags below); ACCEPT_EXPLORE_COMPILE=1 (let bench_explore.py --gpu torch.compile; default: eager, to
# fit the budget); ACCEPT_SITE; DIFFRL_TEST_DEVICE (GPU mode: the gpu tests' device, default cuda).
# Step output: OUTDIR/logs/STEP.log; run directories, JUnit XML and steps.jsonl: OUTDIR/work/.
set -uo pipefail

CALLER_DIR="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

# Wheels the GPU image lacks (its package list has accelerate, filelock, huggingface-hub, peft, pillow, pyyaml, regex,
# requests, safetensors, tensorboard, timm, tokenizers, torch, torchvision, tqdm, transformers). Versions: those of
# constraints.txt and of the venv they were measured with; torchao 0.18 is the release built against torch 2.11 (the
# image's). diffusers also lists importlib_metadata, which it imports only on Python < 3.8: not shipped (its 10.x
# would need lazy-importer too).
GPU_WHEELS=(
  diffusers==0.42.1
  open-clip-torch==3.3.0
  ftfy==6.3.1                 # open_clip's; needs wcwidth
  wcwidth==0.9.5
  torchao==0.18.0             # FP8 exploration (explore.backend native, bench_explore.py --gpu)
)

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

pick_python() {
  if [[ "${PYTHON:-}" == */* && "${PYTHON:-}" != /* ]]; then echo "$CALLER_DIR/$PYTHON"; return; fi
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if [[ "$MODE" == dry-run ]] && ! python3 -c 'import diffrl' 2>/dev/null && [[ -x .venv/bin/python ]]; then
    echo "$ROOT/.venv/bin/python"; return
  fi
  command -v python3 || echo python
}

# ---------------------------------------------------------------------------------------------------- wheels (CPU)
build_wheels() {
  local pip_platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  local had_build=0
  [[ -e build ]] && had_build=1
  mkdir -p .whl && rm -f .whl/*.whl  # one version of each: two stop the whole install on the GPU
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${pip_platforms[@]}" \
    -d .whl "${GPU_WHEELS[@]}" || { echo "pip download failed" >&2; return 1; }
  "$PY" -m pip wheel --no-deps . -w .whl || { echo "building the diffrl wheel failed" >&2; return 1; }
  ((had_build)) || rm -rf build  # what pip wheel's setuptools left behind
  echo "wheels in .whl/ (each with its Requires-Dist outside extras, to check against the GPU image's packages):"
  "$PY" - <<'EOF'
import pathlib, zipfile
total = 0
for whl in sorted(pathlib.Path(".whl").glob("*.whl")):
    size = whl.stat().st_size
    total += size
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    needs = sorted({ln.split(":", 1)[1].split(";")[0].strip() for ln in meta.splitlines()
                    if ln.startswith("Requires-Dist:") and "extra ==" not in ln})
    print(f"  {whl.name}  {size / 2**20:.2f} MiB  needs: {', '.join(needs) or '-'}")
print(f"total {total / 2**20:.2f} MiB (the tree that travels to the GPU machine, .whl included, must stay under 64 MiB)")
EOF
}

# ----------------------------------------------------------------------------------------------------- step runner
# run_step NAME KIND LIMIT_S CMD...: run CMD (output to logs/NAME.log), cut at LIMIT_S or what is left of the
# budget, then let _acceptance_report.py read the step's output into its record (KIND: which parser).
run_step() {
  local name=$1 kind=$2 limit=$3 rc t0 t1
  shift 3
  local left=$((BUDGET_S - (SECONDS - START)))
  ((limit > left)) && limit=$left
  local log="$OUTDIR/logs/$name.log"
  echo "[acceptance] $name: running (at most ${limit} s)"
  t0=$(date +%s.%N)
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET_S} s budget" >"$log"
    rc=124
  else
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
    rc=$?
  fi
  t1=$(date +%s.%N)
  "$PY" scripts/_acceptance_report.py step "$OUTDIR" "$name" "$kind" "$rc" "$(awk "BEGIN {print $t1 - $t0}")" "$limit"
  ((rc == 0)) || tail -n 15 "$log" | sed "s/^/[$name] /" >&2
}

# ----------------------------------------------------------------------------------------------------------- steps
step_install() {  # GPU only: the wheels from --build-wheels, as the device README says
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  shopt -u nullglob
  export PY SITE
  run_step install probe 120 bash -c '
    (($#)) || { echo "{\"ok\": false, \"why\": \"no .whl/*.whl: run --build-wheels on the CPU machine, carry .whl\"}"; exit 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@" &&
    "$PY" scripts/_acceptance_report.py installed "$SITE" "$@"' _ "${wheels[@]}"
  # The checkout first: every step (pytest, python -m diffrl, the scripts/ benchmarks) runs this tree's diffrl; the
  # wheel's own copy is checked against it above.
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
}

step_environment() {  # versions and GPUs; fails when an import the steps need is missing (or, GPU mode, no GPU)
  run_step environment probe 60 "$PY" - <<'EOF'
import importlib, json, os, platform
import torch
out = {"python": platform.python_version(), "torch": torch.__version__}
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
out["gpus"] = gpus
if gpus:
    props = torch.cuda.get_device_properties(0)
    out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_gib=round(props.total_memory / 2**30, 1))
missing = []
for name in ("diffrl", "diffusers", "open_clip", "transformers", "peft", "accelerate", "torchao"):
    try:
        out[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:
        out[name] = f"missing ({type(e).__name__})"
        missing += [name] if name != "torchao" or os.environ["ACCEPT_MODE"] == "gpu" else []
why = ([f"cannot import {', '.join(missing)}"] if missing else []) + \
      (["no CUDA GPU"] if os.environ["ACCEPT_MODE"] == "gpu" and not gpus else [])
print(json.dumps({**out, "ok": not why, "why": "; ".join(why)}))
EOF
}

step_gpu_tests() {  # the tests marked gpu; DIFFRL_TEST_DEVICE=cpu runs them on the CPU in float32
  run_step gpu_tests tests 150 env DIFFRL_TEST_DEVICE="$TEST_DEVICE" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --continue-on-collection-errors --junitxml "$OUTDIR/work/gpu_tests.xml" tests
}

step_train() {  # the main job's config, a few steps
  local overrides
  if [[ "$MODE" == gpu ]]; then
    overrides=(model.device=cuda model.dtype=bfloat16 train.steps=4 data.eval_size=32 data.eval_seeds=1
               log.sample_every=0 log.checkpoint_every=2 log.tensorboard=false)
  else
    overrides=(model.device=cpu model.dtype=float32 sampler.num_steps=4 sampler.eval_steps=4 train.steps=1
               train.prompts_per_step=2 train.trees_per_prompt=2 data.eval_size=4 data.eval_seeds=1
               log.sample_every=0 log.tensorboard=false)
  fi
  run_step train train 75 "$PY" -m diffrl train configs/tiny_shapes.yaml "${overrides[@]}" --out "$OUTDIR/work/train" --overwrite
}

step_bench_throughput() {  # compiled (regional torch.compile) against eager on the embedded tiny model
  # --workloads before --repeats: its list would take the trailing key=value overrides (applied to every workload).
  local args=(--levers eager compile --workloads rollout_flat train_nft --repeats 1 train.prompts_per_step=2
              train.trees_per_prompt=2 sampler.num_steps=2 "sampler.sde_window=[0,1]" data.eval_size=4)
  # dry-run: dynamo off, so the step's own logic runs without 1-2 minutes of inductor compiling C++ on 2 cores (the
  # compiled path's numbers are tests/test_compile.py's); GPU mode compiles.
  local limit=90 dynamo=1
  if [[ "$MODE" == gpu ]]; then
    args=(--levers eager compile --workloads rollout_flat train_ppo train_nft --repeats 2 model.device=cuda)
    limit=120 dynamo=0
  fi
  [[ -n "${ACCEPT_THROUGHPUT_ARGS:-}" ]] && read -ra args <<<"$ACCEPT_THROUGHPUT_ARGS"
  run_step bench_throughput throughput "$limit" env TORCHDYNAMO_DISABLE=$dynamo "$PY" scripts/bench_throughput.py "${args[@]}"
}

step_bench_explore() {  # FP8 exploration: full-size throughput (GPU) and exact regeneration on the embedded model
  local args=(--steps 1 --keep 2 --prompts 2 --eval-every 1 --eval-prompts 2 sampler.num_steps=4 "sampler.sde_window=[0,2]"
              sampler.eval_steps=4 data.eval_size=4)
  [[ "$MODE" == gpu ]] && args=(--gpu --gpu-batch 4 --gpu-iters 3 --gpu-n 16 --gpu-k 4 --prompts 2)
  [[ -n "${ACCEPT_EXPLORE_ARGS:-}" ]] && read -ra args <<<"$ACCEPT_EXPLORE_ARGS"
  # --gpu torch.compiles three copies of the 2.5B transformer at two resolutions (minutes); by default it runs them
  # eagerly here (ACCEPT_EXPLORE_COMPILE=1: compiled, the benchmark's own numbers, if the budget allows).
  local dynamo=0
  [[ "$MODE" == gpu && "${ACCEPT_EXPLORE_COMPILE:-0}" == 0 ]] && dynamo=1
  export ACCEPT_EXPLORE_COMPILE=$((1 - dynamo))
  run_step bench_explore explore 180 env TORCHDYNAMO_DISABLE=$dynamo "$PY" scripts/bench_explore.py "${args[@]}"
}

step_bench_families() {  # full-size SD3.5-Medium / FLUX.1 / Wan 2.1 with a LoRA, random weights (dry-run: --tiny)
  local args=(--tiny --repeats 1 --steps 2 --trained 1)
  [[ "$MODE" == gpu ]] && args=(--batch 2 --steps 4 --trained 2 --repeats 1 --checkpointing)
  [[ -n "${ACCEPT_FAMILIES_ARGS:-}" ]] && read -ra args <<<"$ACCEPT_FAMILIES_ARGS"
  # Last, with the rest of the budget: it builds each model in fp32 on the CPU (FLUX.1's 12B parameters twice).
  run_step bench_families families 600 "$PY" scripts/bench_families_gpu.py "${args[@]}"
}

# ------------------------------------------------------------------------------------------------------------ main
MODE=gpu
case "${1:-}" in
  --build-wheels) MODE=build; PY="$(pick_python)"; build_wheels; exit $? ;;
  --dry-run) MODE=dry-run; OUTDIR="${2:-$ROOT/runs/acceptance_dry_run}" ;;
  -h|--help|"" ) usage ;;
  -*) echo "unknown option $1" >&2; usage ;;
  *) OUTDIR="$1" ;;
esac
PY="$(pick_python)"
SITE="${ACCEPT_SITE:-/tmp/site}"
[[ "$OUTDIR" == /* ]] || OUTDIR="$CALLER_DIR/$OUTDIR"
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -rf "$OUTDIR/logs" "$OUTDIR/work" "$OUTDIR/acceptance.json" "$OUTDIR/acceptance.md"
mkdir -p "$OUTDIR/logs" "$OUTDIR/work"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false ACCEPT_MODE="$MODE"
START=$SECONDS
if [[ "$MODE" == gpu ]]; then
  BUDGET_S=${ACCEPT_BUDGET_S:-460}  # + at most 10 s to kill a step cut short, + the report
  TEST_DEVICE=${DIFFRL_TEST_DEVICE:-cuda}
else
  # A safety net, under the dry-run test's 600 s: about 100 s alone on 2 cores, 400 s beside two training runs.
  BUDGET_S=${ACCEPT_BUDGET_S:-540}
  TEST_DEVICE=cpu
fi
echo "[acceptance] mode $MODE, python $PY, output $OUTDIR, budget ${BUDGET_S} s"
[[ "$MODE" == gpu ]] && step_install
step_environment
step_gpu_tests
step_train
step_bench_throughput
step_bench_explore
step_bench_families
"$PY" scripts/_acceptance_report.py final "$OUTDIR" "$MODE"
