#!/usr/bin/env bash
# The one command of a call to a lent GPU machine (docs/model.md, "Training on a lent GPU"): install the carried
# wheels if the machine lacks them, unpack CIFAR-10, train within the time left, and leave the bundle and the logs
# in $OUT as at most 8 files under 16 MiB (bench/device/collect.sh rebuilds the bundle here):
#
#   bash bench/device/prepare.sh                  # here, once: fills .device/
#   run(command="bash bench/device/run.sh", carry=[".device"], timeout_s=600)
#
# Environment:
#   CBIR_DEVICE_TRAIN_ARGS   cbir train options after device_run.py's RECIPE (they win), e.g. "--sam-rho 0.05"
#   CBIR_DEVICE_BUDGET_MIN   at most this many minutes of training steps (default 5.5)
#   CBIR_DEVICE_DEADLINE_S   the seconds this whole command may take, the budget shrinks to fit (default 540)
#   CBIR_DEVICE_TINY=1       the CPU rehearsal: a narrow network, 5 images a class, seconds of training
#   CBIR_DEVICE_DIR          the carried folder (default .device); CBIR_DEVICE_WORK the scratch folder (default
#                            a new one in /tmp); CBIR_DEVICE_PART_BYTES the largest part of the weights
#   OUT                      where the returned files go (set by the device tool; default runs/device/out)
set -uo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s.%N)
device_dir=${CBIR_DEVICE_DIR:-.device}
out=${OUT:-runs/device/out}
work=${CBIR_DEVICE_WORK:-$(mktemp -d)}
python=${PYTHON:-python3}
logs="$work/logs"
mkdir -p "$logs" "$out" || exit 1
exec > >(tee -a "$logs/run.log") 2>&1
export PYTHONUNBUFFERED=1
since() {  # seconds since a `date +%s%N` reading, as 1.234
    local ns=$(($(date +%s%N) - $1))
    printf '%d.%03d' $((ns / 1000000000)) $((ns / 1000000 % 1000))
}
tiny=()
budget=${CBIR_DEVICE_BUDGET_MIN:-5.5}
if [ "${CBIR_DEVICE_TINY:-0}" = 1 ]; then
    tiny=(--tiny)
    budget=${CBIR_DEVICE_BUDGET_MIN:-0.02}
fi

step=$(date +%s%N)
if ! "$python" -c "import pydantic, pydantic_settings" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$device_dir"/wheels/*.whl || exit 1
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
install_s=$(since "$step")

step=$(date +%s%N)
"$python" bench/device/cifar10_pack.py unpack "$device_dir/cifar10.pack.npz" "$work/cifar10" || exit 1
unpack_s=$(since "$step")

{ nvidia-smi || echo "no nvidia-smi"; } >"$logs/nvidia-smi.txt" 2>&1
"$python" -m pip list >"$logs/pip-list.txt" 2>&1
# Training plans its budget to end in time; should it overrun, it is interrupted 20 s before the deadline so
# that the logs still come back.
deadline=${CBIR_DEVICE_DEADLINE_S:-540}
interrupt=()
if command -v timeout >/dev/null; then
    interrupt=(timeout -s INT $((deadline - 20 - ($(date +%s) - ${started%.*}))))
fi
# shellcheck disable=SC2086
"${interrupt[@]}" "$python" bench/device/device_run.py train --data-dir "$work/cifar10" --work "$work" \
    --started "$started" --deadline-s "$deadline" --budget-min "$budget" "${tiny[@]}" \
    --phase "install=$install_s" --phase "unpack=$unpack_s" -- ${CBIR_DEVICE_TRAIN_ARGS:-}
status=$?
{ nvidia-smi || true; } >>"$logs/nvidia-smi.txt" 2>&1
"$python" bench/device/device_run.py pack-out "$work/bundle" "$out" --logs "$logs" \
    --part-bytes "${CBIR_DEVICE_PART_BYTES:-15728640}" || exit 1
exit "$status"
