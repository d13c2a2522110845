#!/usr/bin/env bash
# Run bench/gpu_check.py on a GPU machine whose Python (3.12, torch, transformers) lacks decord
# and PyAV and cannot reach a package registry: install the carried wheels into a temporary site
# directory first. Two steps:
#
#   bench/gpu_check.sh --fetch-wheels      # here, with network: wheels -> bench/wheels/ (git-ignored)
#   bench/gpu_check.sh [gpu_check.py args] # there, with bench/wheels carried along
#
# With the device tool: run(command="bench/gpu_check.sh", carry=["bench/wheels"], timeout_s=540).
# The working tree plus the wheels must stay under 64 MiB; --fetch-wheels checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${MVREC_WHEELS:-bench/wheels}
# decord has no Python-version tag (py3-none); av is cp311-abi3, so it loads on 3.12.
PINS=(decord==0.6.0 av==18.1.0)
LIMIT_MIB=64

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux2010_x86_64 -d "$WHEELS" "${PINS[@]}"
    ls -l "$WHEELS"
    tree_kib=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- | tail -1 | cut -f1)
    wheels_kib=$(du -sk "$WHEELS" | cut -f1)
    total_mib=$(( (tree_kib + wheels_kib) / 1024 ))
    echo "working tree ${tree_kib} KiB + wheels ${wheels_kib} KiB = ${total_mib} MiB (limit ${LIMIT_MIB} MiB)"
    (( total_mib < LIMIT_MIB )) || { echo "too large to carry" >&2; exit 1; }
    exit 0
fi

SITE=$(mktemp -d /tmp/mvrec-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
python3 bench/gpu_check.py "$@"
