#!/usr/bin/env bash
# The checks that need a CUDA GPU, run by hand on a GPU workstation (CI has none), most
# telling first, so a short session on a borrowed machine gets the numbers that matter:
#   1. throughput as a user sees it: main.py with the built-in model and default flags over
#      2,048 images (bench.py part t; with BASELINE=DIR, another checkout timed beside it);
#   2. the engine on the GPU, batch 64: bench.py parts a-c (the README's GPU table);
#   3. the whole test suite, the CUDA-only tests included.
#
# Usage:  bench/gpu_check.sh [LOG_DIR]        (default: ./gpu_check; one .log per step)
# Environment: BASELINE=DIR   another checkout of the tool for step 1 (e.g. 7db66bd)
#              MODELS="..."   step 2's models (default: the built-in one, resnet50, vgg16)
#              STEPS="..."    which of throughput, engine, tests to run (default: all three)
#              PYTEST_ARGS    extra pytest arguments (e.g. "-n 8" with pytest-xdist)
# Exit status: 0 when every step ran cleanly, 1 otherwise; each step runs regardless.
set -uo pipefail
absolute() { python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
logs="$(absolute "${1:-gpu_check}")"      # both relative to where it is run from
baseline="${BASELINE:+$(absolute "$BASELINE")}"
cd "$(dirname "$0")/.."
mkdir -p "$logs"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
models="${MODELS:-efficientnet-lite0 resnet50 vgg16}"
steps="${STEPS:-throughput engine tests}"
failed=0

step() {  # step NAME COMMAND...: run it, its output on screen and in LOG_DIR/NAME.log
    local name=$1
    shift
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$logs/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s"
    [ "$code" -eq 0 ] || failed=1
}

python - <<'EOF' 2>&1 | tee "$logs/machine.log"
import os
import torch
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"{card}; {len(os.sched_getaffinity(0))} usable CPUs; torch {torch.__version__}")
EOF

# shellcheck disable=SC2086  # models and pytest arguments are word lists
step throughput python bench/bench.py --device cuda --parts t ${baseline:+--baseline "$baseline"}
step engine python bench/bench.py --device cuda --batch_size 64 --parts abc --models $models
step tests python -m pytest -q ${PYTEST_ARGS:-}
exit "$failed"
