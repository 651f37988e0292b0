#!/usr/bin/env bash
# Every CUDA check in one command, for a machine with a GPU (CI has none).
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with the package registry: fills .gpu/ (ignored by git)
#   bash benchmarks/gpu_check.sh             # there: the checks; status 0 only if every step passed
#
# The checks (run it with timeout_s 600; on one H100 the suite needed about 400 s, the benchmarks 170 s):
#   1. the whole test suite with CUDA present: every trainer test on the CPU and on CUDA,
#      including the SIGKILL / SIGTERM / SIGINT kill-and-resume tests on CUDA with
#      deterministic=True in full precision, bf16 and fp16 (listed one by one after the summary);
#   2. the per-batch overhead benchmark on CUDA;
#   3. the checkpoint save/load benchmark with the state on CUDA;
#   4. the preemption benchmark (SIGTERM to exit) on CUDA, small and 1.5 GB;
#   5. the torchrun benchmark (1 and 2 ranks on the GPU(s): NCCL with a GPU per rank, else gloo);
#   6. ResNet-18 throughput, eager and compiled, against a hand loop and Lightning (if it imports there).
# The suite includes the torchrun tests (tests/test_distributed.py) on CUDA: two ranks, SIGKILL and SIGTERM
# resume, another world size. GPU_CHECK_TESTS=tests/test_distributed.py runs them alone.
#
# GPU_CHECK_DEVICE=cpu GPU_CHECK_TESTS=tests/test_preemption.py bash benchmarks/gpu_check.sh
# rehearses the script on a machine without a GPU.
#
# Python: the machine's python3 (or $PYTHON). Packages it lacks (statetrainer needs
# `transitions`, the resume tests `torchdata`) are installed from the wheels in .gpu/wheels; the real MNIST test set
# in .gpu/mnist, when there, lets the real-data tests run. --prepare puts both there.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/mnist
  # the library, the resume tests, the overhead comparison and the ResNet-18 comparison need these
  for package in transitions torchdata pytorch-ignite lightning pytorch-lightning lightning-utilities torchmetrics; do
    version=$(uv run --group bench python -c "import importlib.metadata as m; print(m.version('$package'))")
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d .gpu/wheels "$package==$version"
  done
  mnist="${STATETRAINER_MNIST:-$root/../shared/data/mnist}"
  if [[ -d "$mnist" ]]; then cp "$mnist"/t10k-*.gz .gpu/mnist/; fi
  ls -la .gpu/wheels .gpu/mnist
  exit 0
fi

python=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
read -r -a tests <<<"${GPU_CHECK_TESTS:-tests}"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
if ! "$python" -c "import transitions" 2>/dev/null; then
  if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/statetrainer-site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/statetrainer-site
  else
    echo "transitions is not installed and .gpu/wheels is empty: run 'bash benchmarks/gpu_check.sh --prepare' where pip works" >&2
    exit 2
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".gpu/mnist/*.gz" >/dev/null; then export STATETRAINER_MNIST="$root/.gpu/mnist"; fi
log=${OUT:-/tmp}/gpu_check.log
: >"$log"

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, show the tail
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name"
  timeout "$limit" "$@" >>"$log" 2>&1
  local status=$?
  [[ $status -eq 0 ]] || failed+=("$name (status $status)")
  echo "   status $status, $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$python" - <<'PYTHON'
import sys, torch, transitions
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, gpu, "transitions", transitions.__version__)
PYTHON

workers=()
if "$python" -c "import xdist" 2>/dev/null; then workers=(-n 12); fi
# The CPU cases of the subprocess tests (kill-and-resume, torchrun) take most of the time and run in CI already.
step "test suite" 420 "$python" -m pytest -v -p no:cacheprovider "${workers[@]}" "${tests[@]}" \
  -k "not (test_kill_and_resume and cpu) and not (test_distributed and cpu)"
grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$log" | tail -40
echo "-- CUDA kill-and-resume and torchrun tests:"
grep -E "(test_kill_and_resume|test_distributed)\.py::[^ ]*cuda" "$log" | grep -E "PASSED|FAILED|ERROR|SKIPPED" | sed -E 's/\[gw[0-9]+\] //; s/ *\[ *[0-9]+%\]//' | sort | head -30

benchmarks_start=$(wc -l <"$log")
step "overhead benchmark ($device)" 120 "$python" benchmarks/overhead.py --device "$device" --rounds 5 --batches 1000
step "checkpoint benchmark ($device)" 150 "$python" benchmarks/checkpoint.py --device "$device" --repeats 3
step "preemption benchmark ($device)" 150 "$python" benchmarks/preemption.py --device "$device" --repeats 1
step "torchrun benchmark ($device)" 120 "$python" benchmarks/ddp.py --device "$device" --rounds 3 --saves 3
resnet_sizes=()  # a rehearsal on the CPU: small images, few batches
if [[ "$device" == cpu ]]; then resnet_sizes=(--batch-size 8 --image-size 32 --batches 4); fi
step "ResNet-18 benchmark ($device)" 300 "$python" benchmarks/resnet.py --device "$device" --rounds 3 "${resnet_sizes[@]}"
tail -n +"$((benchmarks_start + 1))" "$log"

if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all GPU checks passed"
