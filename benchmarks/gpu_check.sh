#!/usr/bin/env bash
# The CUDA path proven in one call, on a machine that may have no package index:
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--cpu-smoke]
#
# 1. --wheels DIR: installs ptxlab from a wheelhouse (scripts/wheelhouse.sh) into a fresh venv
#    that sees the host's PyTorch (scripts/offline_install.sh); without it, uses the Python that
#    already has ptxlab ($PYTHON, else this repository's .venv, else python3).
# 2-6. benchmarks/gpu_check.py: gpu_step.py variants, a 2-epoch AMP run killed in epoch 2 and
#    resumed, the same run under `--nproc 1`, evaluate and predict; see benchmarks/README.md.
# The report goes to $OUT/gpu_check.json when OUT is set, else ./gpu_check.json, and is printed
# last. Exit 0 when every step passed. Budget: 480 s on a GPU (GPU_CHECK_BUDGET to change),
# 900 s for --cpu-smoke, each step within its own limit as well.
set -uo pipefail
started=$(date +%s)
repo=$(cd "$(dirname "$0")/.." && pwd)
wheels="" smoke=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        --cpu-smoke) smoke=(--cpu-smoke); shift ;;
        *) echo "error: unknown argument $1 (usage: $0 [--wheels DIR] [--cpu-smoke])" >&2; exit 2 ;;
    esac
done
budget=${GPU_CHECK_BUDGET:-$([[ ${#smoke[@]} -gt 0 ]] && echo 900 || echo 480)}
report=${OUT:-$PWD}/gpu_check.json
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

install=""
if [[ -n $wheels ]]; then
    venv=$(mktemp -d)/venv
    log=$(mktemp)
    echo "installing ptxlab from $wheels into $venv" >&2
    if timeout 480 bash "$repo/scripts/offline_install.sh" "$wheels" "$venv" >"$log" 2>&1; then
        status=pass error=null
    else
        status=fail
        error=$(grep -v '^\s*$' "$log" | tail -1 | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().strip()))')
    fi
    python=$venv/bin/python
    install=$(printf '{"name": "install", "status": "%s", "seconds": %d, "error": %s, "wheels": "%s"}' \
        "$status" $(($(date +%s) - started)) "$error" "$wheels")
    rm -f "$log"
elif [[ -n ${PYTHON:-} ]]; then
    python=$PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=python3
fi

exec python3 "$repo/benchmarks/gpu_check.py" --python "$python" "${smoke[@]}" --out "$report" \
    --budget "$budget" --started "$started" ${install:+--install "$install"}
