#!/usr/bin/env bash
# Install ptxlab from a wheelhouse (scripts/wheelhouse.sh) into a new venv that sees the host's
# PyTorch, with no package index:
#
#   scripts/offline_install.sh WHEELS VENV        (PYTHON=... to choose the host's interpreter)
#
# The venv sees exactly what the host's interpreter sees: `--system-site-packages` where that is
# a base installation; where it is a virtual environment itself (common on GPU images, and
# `--system-site-packages` would then reach only the base installation below it), a .pth file
# naming that environment's site folders instead. The venv gets no pip of its own (it would
# shadow the host's setuptools); the host's pip, seen through those folders, installs into it.
set -euo pipefail
[[ $# -eq 2 ]] || { sed -n '5p' "$0" >&2; exit 2; }
wheels=$1 target=$2
python=${PYTHON:-python3}
[[ -d $wheels ]] || { echo "error: $wheels: no such wheelhouse folder" >&2; exit 2; }

host_sites=$("$python" -c 'import site, sys
if sys.prefix != sys.base_prefix: print("\n".join(site.getsitepackages()))')
if [[ -z $host_sites ]]; then
    "$python" -m venv --system-site-packages --without-pip "$target"
else
    "$python" -m venv --without-pip "$target"
    purelib=$("$target/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf '%s\n' "$host_sites" > "$purelib/host-python.pth"
fi
"$target/bin/python" -m pip install -q --no-index --find-links "$wheels" ptxlab
