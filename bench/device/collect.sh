#!/usr/bin/env bash
# Rebuild here the bundle a lent GPU machine's bench/device/run.sh returned: join model.safetensors's parts,
# check every file against the machine's SHA256SUMS, load the bundle as the embedder does, unpack the logs beside it.
#
#   bash bench/device/collect.sh FILES_AT [BUNDLE_DIR]     # FILES_AT: the folder the device tool's reply names
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: bash bench/device/collect.sh FILES_AT [BUNDLE_DIR (default runs/device/bundle)]" >&2
    exit 2
fi
"${PYTHON:-python}" bench/device/device_run.py collect "$1" "${2:-runs/device/bundle}"
