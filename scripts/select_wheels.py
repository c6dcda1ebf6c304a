"""Which of a pip resolution's packages a wheelhouse must carry (used by wheelhouse.sh).

Reads the JSON report of `pip install --dry-run --report` for ptxlab's wheel and walks the
requirement graph from ptxlab, for the target Python on Linux x86-64. The excluded packages are
on the host and are left out, with what only they require (torch's CUDA libraries). What a
carried package requires is carried even when an excluded one requires it too: the host's copy
may be older or absent (typer 0.12 did not need pydantic, later releases do), and pip keeps a
host copy that satisfies the requirement anyway. Prints one `name==version` per line to carry,
and writes to stderr what the host must already have, with the requirements on each.

    python3 scripts/select_wheels.py REPORT.json --python 3.12 --exclude torch torchvision ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def target_environment(python: str) -> dict[str, str]:
    """Marker values of CPython `python` on Linux x86-64."""
    environment = default_environment()
    environment.update(
        python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
        platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
        platform_machine="x86_64", os_name="posix", extra="",
    )
    return environment


def requirements(metadata: dict, environment: dict[str, str], extra: str = "") -> list:
    """The requirements of a package's `extra` ("" for the base ones) in `environment`."""
    wanted = []
    for line in metadata.get("requires_dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None and extra:
            continue  # base requirements are followed with extra ""
        if marker is None or marker.evaluate({**environment, "extra": extra}):
            wanted.append(requirement)
    return wanted


def select(report: dict, python: str, exclude: set[str]) -> tuple[list[str], dict[str, set]]:
    """(`name==version` of every package to carry, {excluded name: requirements on it})."""
    packages = {canonicalize_name(item["metadata"]["name"]): item["metadata"]
                for item in report["install"]}
    environment = target_environment(python)
    carried, visited, needed_from_host = set(), set(), defaultdict(set)
    pending = [("ptxlab", "")]
    while pending:
        name, extra = pending.pop()
        if (name, extra) in visited:
            continue
        visited.add((name, extra))
        carried.add(name)
        for requirement in requirements(packages[name], environment, extra):
            wanted = canonicalize_name(requirement.name)
            if wanted in exclude:
                needed_from_host[wanted].add(f"{requirement} (for {name})")
            elif wanted in packages:
                pending += [(wanted, e) for e in ["", *requirement.extras]]
            else:
                raise SystemExit(f"error: {name} needs {wanted}, which pip did not resolve")
    pins = sorted(f"{packages[name]['name']}=={packages[name]['version']}"
                  for name in carried if name != "ptxlab")
    return pins, needed_from_host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="pip's --report JSON")
    parser.add_argument("--python", required=True, help="target Python, e.g. 3.12")
    parser.add_argument("--exclude", nargs="*", default=[], help="packages the host has")
    args = parser.parse_args()
    with open(args.report) as handle:
        report = json.load(handle)
    pins, needed = select(report, args.python, {canonicalize_name(n) for n in args.exclude})
    print("\n".join(pins))
    for name in sorted(needed):
        print(f"host must provide {name}: {'; '.join(sorted(needed[name]))}", file=sys.stderr)


if __name__ == "__main__":
    main()
