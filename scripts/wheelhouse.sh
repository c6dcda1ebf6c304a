#!/usr/bin/env bash
# Wheels for installing ptxlab on a Linux x86-64 host that cannot reach a package index.
#
#   scripts/wheelhouse.sh DIR [--python 3.12] [--exclude PKG ...] [--only-exclude PKG ...]
#
# Run it where PyPI is reachable. It builds ptxlab's wheel into DIR, resolves ptxlab's
# dependencies for CPython X.Y on manylinux x86-64 (pip --dry-run --report), and downloads into
# DIR the wheels of everything ptxlab needs except what the host already has: by default
# torch, torchvision, timm, opencv-python-headless, numpy, pandas and typer (the usual GPU
# server's system-wide stack), plus any --exclude PKG; --only-exclude PKG ... replaces the
# default list. What only excluded packages need (torch's CUDA libraries) is left out too.
# DIR/HOST-REQUIREMENTS.txt lists what the host must provide; the last line is DIR's size.
#
# On the host, with the system PyTorch:
#   python3 -m venv --system-site-packages ~/ptxlab-venv
#   ~/ptxlab-venv/bin/pip install --no-index --find-links DIR ptxlab
set -euo pipefail

usage() { sed -n '4p' "$0" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
dir=$1; shift
python_version=3.12
excludes=(torch torchvision timm opencv-python-headless numpy pandas typer)
adding=default
while [[ $# -gt 0 ]]; do
    case $1 in
        --python) python_version=${2:?--python needs a version like 3.12}; shift 2 ;;
        --exclude) adding=extra; shift ;;
        --only-exclude) adding=extra; excludes=(); shift ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [[ $adding == extra ]] || usage; excludes+=("$1"); shift ;;
    esac
done
[[ $python_version =~ ^3\.[0-9]+$ ]] || { echo "error: --python $python_version: want 3.N" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

# pip matches manylinux tags exactly: offer every glibc a current x86-64 host can have.
platforms=(--platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
           --platform manylinux2014_x86_64)
for minor in $(seq 17 39); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
target=(--only-binary=:all: --implementation cp --python-version "$python_version" "${platforms[@]}")

echo "building ptxlab's wheel" >&2
rm -f "$dir"/ptxlab-*.whl
python3 -m pip wheel -q --no-deps --wheel-dir "$dir" "$repo"
wheel=$(ls "$dir"/ptxlab-*.whl)

echo "resolving ptxlab's dependencies for CPython $python_version, Linux x86-64" >&2
python3 -m pip install -q --dry-run --ignore-installed --target "$work/target" \
    --report "$work/report.json" "${target[@]}" "$wheel"
python3 "$repo/scripts/select_wheels.py" "$work/report.json" --python "$python_version" \
    --exclude "${excludes[@]}" > "$work/pins.txt" 2> "$dir/HOST-REQUIREMENTS.txt"

echo "downloading $(wc -l < "$work/pins.txt") wheels (left out: ${excludes[*]})" >&2
python3 -m pip download -q --no-deps --dest "$dir" "${target[@]}" --requirement "$work/pins.txt"

mapfile -t wheels < <(ls -S "$dir"/*.whl)
echo "largest wheels:" >&2
for file in "${wheels[@]:0:5}"; do
    printf '  %6.1f MiB  %s\n' "$(du -k "$file" | awk '{print $1 / 1024}')" "$(basename "$file")" >&2
done
size_kib=$(du -sk "$dir" | awk '{print $1}')
printf 'wheelhouse %s: %d wheels, %.1f MiB\n' "$dir" "${#wheels[@]}" \
    "$(awk -v k="$size_kib" 'BEGIN {print k / 1024}')"
