#!/usr/bin/env bash
# Fill .device/ (git-ignored; a device call names it in `carry`) with what bench/device/run.sh needs on a lent GPU
# machine and the machine lacks: the CIFAR-10 pack (all 60,000 JPEGs, 20 MB) and the wheels of the packages
# `cbir train` imports beyond the machine's image, for its Python 3.12 (docs/model.md, "Training on a lent GPU").
#
#   bash bench/device/prepare.sh          # here, with the project's environment active and PyPI reachable
#
# CBIR_DEVICE_DIR (default .device) and CBIR_PACK (default ../shared/cifar10.pack.npz) change where.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${CBIR_DEVICE_DIR:-.device}
pack=${CBIR_PACK:-../shared/cifar10.pack.npz}
python=${PYTHON:-python}

# `cbir train` must import with only the machine's packages and the carried ones.
"$python" bench/device/device_run.py check-imports

mkdir -p "$dest/wheels"
install -m 0644 "$pack" "$dest/cifar10.pack.npz"
rm -f "$dest"/wheels/*.whl
# The versions this checkout is tested with; one version of each (two would stop the install there).
# shellcheck disable=SC2046
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest "$dest/wheels" \
    $("$python" bench/device/device_run.py pins)
# The same install as run.sh's, for Python 3.12 on x86-64, into a folder thrown away: every wheel fits.
check=$(mktemp -d)
"$python" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --target "$check" \
    "$dest"/wheels/*.whl
rm -rf "$check"

ls -l "$dest" "$dest/wheels"
# What a call sends: the tracked files and the untracked ones git does not ignore, plus the carried folder.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
carried=$(du -sb "$dest" | cut -f1)
echo "payload: working tree ${tree} B + ${dest} ${carried} B = $((tree + carried)) B of $((64 * 1024 * 1024)) B"
