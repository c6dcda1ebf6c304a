"""The CUDA path in one call: timed training steps, a killed and resumed AMP run, the same run
under torchrun, evaluation and prediction; one JSON report. Started by gpu_check.sh.

Standard library only: it runs every step as a subprocess of `--python` (the interpreter with
ptxlab installed), so it writes its report even when the install or an import failed. Each
step has its own time limit; all of them share `--budget` seconds counted from `--started`.
`--cpu-smoke` runs the same steps tiny on the CPU (gloo instead of NCCL).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).parent
REPO = BENCHMARKS.parent
PER_EPOCH = ("train_loss", "val_loss", "val_iou", "val_dice")  # one value per epoch step
EPOCHS = 2
# The run of steps 3-5: phantoms at 512² with the study's model and AMP on CUDA; tiny on the CPU.
GPU_RUN = [str(REPO / "experiments/paper.yaml"), "data.source=synthetic",
           "data.synthetic.n_images=320", "data.synthetic.size=512", "data.image_size=512",
           "data.num_workers=4", "model.encoder_weights=null", "train.device=cuda",
           "train.amp=true"]
SMOKE_RUN = [None, "data.synthetic.n_images=24", "data.synthetic.size=64", "data.image_size=64",
             "model.encoder_weights=null", "model.decoder_channels=[16,16,16,16,16]",
             "train.batch_size=4", "train.device=cpu"]
COMMON_RUN = [f"train.epochs={EPOCHS}", "train.early_stopping_patience=0",
              "tracking.system_metrics=false", "tracking.overlays=2"]
# Seconds each step may take at most (GPU, CPU smoke).
# The CPU smoke's are generous: on 2 busy cores a tiny run can take minutes.
LIMITS = {"environment": (60, 120), "gpu_step": (150, 240), "run_killed": (150, 300),
          "resume": (120, 300), "nproc_1": (150, 360), "evaluate": (60, 180),
          "predict": (60, 180), "gpu_step_compile": (300, 0)}
COMPILE_NEEDS = 90  # seconds below which compiling B4 forward + backward is not attempted

HOST_INFO = """
import json, platform, importlib.metadata as m, importlib.util, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torchvision": m.version("torchvision"), "ptxlab": m.version("ptxlab"),
        "ptxlab_path": importlib.util.find_spec("ptxlab").submodule_search_locations[0],
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), cudnn=torch.backends.cudnn.version(),
                gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                bf16_supported=torch.cuda.is_bf16_supported())
print(json.dumps(info))
"""


class Check:
    """The steps' shared state: interpreter, work folder, time left, and the report."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.python, self.smoke, self.work = args.python, args.cpu_smoke, work
        self.deadline = args.started + args.budget
        self.report = {"mode": "cpu-smoke" if self.smoke else "gpu", "budget_s": args.budget,
                       "host": {}, "gpu_step": {}, "steps": []}
        self.env = {**os.environ, "PTXLAB_CACHE": str(work / "cache"), "PTXLAB_PROGRESS": "0",
                    "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the local store under work/mlruns

    def limit(self, step: str) -> float:
        """Seconds `step` may take: its own limit, or what is left of the budget if less."""
        own = LIMITS[step][1 if self.smoke else 0]
        return max(0.0, min(own, self.deadline - time.time() - 5))

    def record(self, name: str, started: float, error: str | None = None, **details) -> dict:
        step = {"name": name, "status": "fail" if error else "pass",
                "seconds": round(time.time() - started, 1), "error": error, **details}
        self.report["steps"].append(step)
        print(f"[{step['status']}] {name} ({step['seconds']} s)" + (f": {error}" if error else ""),
              file=sys.stderr, flush=True)
        return step

    def skip(self, name: str, reason: str) -> None:
        self.report["steps"].append({"name": name, "status": "skipped", "seconds": 0,
                                     "error": None, "reason": reason})
        print(f"[skipped] {name}: {reason}", file=sys.stderr, flush=True)

    def start(self, args: list[str]) -> subprocess.Popen:
        """`python args...` in the work folder, in a process group of its own."""
        return subprocess.Popen([self.python, *args], cwd=self.work, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def call(self, step: str, args: list[str]) -> tuple[str | None, str]:
        """Run to the end within the step's limit: (the error line or None, stdout)."""
        limit = self.limit(step)
        process = self.start(args)
        try:
            out, err = process.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            kill(process)
            return f"timed out after {limit:.0f} s (budget or step limit)", ""
        if process.returncode != 0:
            return f"exit {process.returncode}: {last_line(err or out)}", out
        return None, out

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.work / 'mlruns/mlflow.db'}?mode=ro", uri=True)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (torchrun's ranks, loader workers)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no output)"


def run_args(check: Check, experiment: str) -> list[str]:
    config, *overrides = SMOKE_RUN if check.smoke else GPU_RUN
    args = ["-m", "ptxlab", "run", *([config] if config else [])]
    for override in [*overrides, *COMMON_RUN, f"tracking.experiment={experiment}"]:
        args += ["--set", override]
    return args


def query(check: Check, sql: str, *values) -> list[tuple]:
    """Rows from the MLflow SQLite store; none while it does not exist yet."""
    try:
        with check.db() as connection:
            return connection.execute(sql, values).fetchall()
    except sqlite3.Error:
        return []


def run_of(check: Check, experiment: str) -> str | None:
    rows = query(check, "SELECT r.run_uuid FROM runs r JOIN experiments e ON "
                        "r.experiment_id = e.experiment_id WHERE e.name = ?", experiment)
    return rows[0][0] if rows else None


def epoch_problem(check: Check, run_id: str, epochs: int) -> str | None:
    """What is wrong with the run's per-epoch metrics and status, or None."""
    for key in PER_EPOCH:
        steps = sorted(s for (s,) in query(
            check, "SELECT step FROM metrics WHERE run_uuid = ? AND key = ?", run_id, key))
        if steps != list(range(epochs)):
            return f"{key} has steps {steps}, want one value for each of {list(range(epochs))}"
    status = query(check, "SELECT status FROM runs WHERE run_uuid = ?", run_id)
    if status != [("FINISHED",)]:
        return f"run {run_id} is {status[0][0] if status else 'missing'}, not FINISHED"
    return None


def tags(check: Check, run_id: str, *keys: str) -> dict:
    rows = query(check, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id)
    return {key.removeprefix("ptxlab."): value for key, value in rows if key in keys}


def step_environment(check: Check) -> None:
    started = time.time()
    error, out = check.call("environment", ["-c", HOST_INFO])
    if not error:
        check.report["host"].update(json.loads(out.splitlines()[-1]))
    smi = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        name, driver = subprocess.run(smi, capture_output=True, text=True, timeout=30,
                                      check=True).stdout.splitlines()[0].split(", ")
        check.report["host"].update(driver=driver, gpu=check.report["host"].get("gpu", name))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        check.report["host"]["driver"] = None  # no NVIDIA driver here
    if not error and not check.smoke and not check.report["host"]["cuda_available"]:
        error = f"torch {check.report['host']['torch']} sees no CUDA device"
    installed = Path(check.report["host"].pop("ptxlab_path", REPO / "ptxlab"))
    if not error and source_digest(installed) != source_digest(REPO / "ptxlab"):
        error = (f"the ptxlab installed at {installed} is not this checkout's (a wheelhouse "
                 "built from another commit?): rebuild it with scripts/wheelhouse.sh")
    check.record("environment", started, error)


def source_digest(package: Path) -> str:
    """SHA-256 over a ptxlab package's Python files, by path within the package."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def step_gpu_step(check: Check, step: str, variants: list[str]) -> None:
    """benchmarks/gpu_step.py for `variants`; their figures go to report['gpu_step']."""
    started = time.time()
    figures = check.work / f"{step}.json"
    args = [str(BENCHMARKS / "gpu_step.py"), "--json", str(figures), "--variants", *variants]
    if check.smoke:
        args += ["--cpu-smoke", "--steps", "1"]
    error, _ = check.call(step, args)
    measured = json.loads(figures.read_text()) if figures.exists() else {"variants": {}}
    check.report["gpu_step"].update({k: v for k, v in measured.items() if k != "variants"})
    check.report["gpu_step"].setdefault("variants", {}).update(measured["variants"])
    missing = [name for name in variants if name not in measured["variants"]]
    check.record(step, started, error or (f"no figures for {missing}" if missing else None),
                 variants=variants)


def step_run_killed(check: Check) -> str | None:
    """Start the 2-epoch run, SIGKILL it once epoch 1 is logged (so in epoch 2); its run id."""
    started, experiment = time.time(), "gpu-check"
    process = check.start(run_args(check, experiment))
    deadline, run_id, error = started + check.limit("run_killed"), None, None
    while time.time() < deadline and process.poll() is None:
        run_id = run_id or run_of(check, experiment)
        if run_id and query(check, "SELECT 1 FROM metrics WHERE run_uuid = ? AND key = "
                                   "'val_iou' AND step = 0", run_id):
            break
        time.sleep(0.1)
    if process.poll() is not None:
        error = f"the run ended before epoch 2 (exit {process.returncode}): " + last_line(
            process.communicate()[1])
    elif time.time() >= deadline:
        error = "epoch 1 did not finish within the step's limit"
    kill(process)
    if not error and query(check, "SELECT 1 FROM metrics WHERE run_uuid = ? AND key = 'val_iou' "
                                  "AND step = 1", run_id):
        error = "epoch 2 had ended when the kill came"
    check.record("run_killed", started, error, run_id=run_id)
    return None if error else run_id


def step_resume(check: Check, run_id: str) -> None:
    started = time.time()
    error, out = check.call("resume", ["-m", "ptxlab", "run", "--resume", run_id])
    if not error and f"run id: {run_id}" not in out:
        error = "the resumed run did not report the same run id"
    check.record("resume", started, error or epoch_problem(check, run_id, EPOCHS), run_id=run_id,
                 **tags(check, run_id, "ptxlab.device", "ptxlab.amp", "ptxlab.start_epoch"))


def step_nproc(check: Check) -> str | None:
    """The same run through torchrun in one process (NCCL on CUDA, gloo on the CPU)."""
    started, experiment = time.time(), "gpu-check-nproc"
    error, _ = check.call("nproc_1", [*run_args(check, experiment), "--nproc", "1"])
    run_id = run_of(check, experiment)
    if not error:
        error = epoch_problem(check, run_id, EPOCHS) if run_id else "no run was logged"
    details = tags(check, run_id, "ptxlab.device", "ptxlab.processes") if run_id else {}
    check.record("nproc_1", started, error, run_id=run_id, **details)
    return None if error else run_id


def step_evaluate_predict(check: Check, run_id: str) -> None:
    """`ptxlab evaluate` on the run's phantoms, `ptxlab predict` on four of them."""
    [phantoms] = (check.work / "cache/synthetic").glob("synthetic-*/")
    started = time.time()
    error, out = check.call("evaluate", ["-m", "ptxlab", "evaluate", run_id, "--data",
                                         str(phantoms), "--layout", "folder", "--json"])
    try:
        metrics = {} if error else json.loads(out.splitlines()[-1])["metrics"]
    except (ValueError, KeyError, IndexError) as problem:
        error, metrics = f"evaluate --json printed no metrics ({problem!r})", {}
    check.record("evaluate", started, error, run_id=run_id, metrics=metrics)

    started, predictions = time.time(), check.work / "predictions"
    images = sorted(str(p) for p in (phantoms / "images").glob("*.png"))[:4]
    error, _ = check.call("predict", ["-m", "ptxlab", "predict", run_id, *images, "--out",
                                      str(predictions)])
    masks = sorted(predictions.glob("*_mask.png")) if predictions.exists() else []
    if not error and len(masks) != len(images):
        error = f"{len(masks)} masks written for {len(images)} images"
    check.record("predict", started, error, run_id=run_id, images=len(images))


def step_compile(check: Check) -> None:
    if check.smoke:
        check.skip("gpu_step_compile", "not in the CPU smoke: compiling takes minutes on a CPU")
    elif check.limit("gpu_step_compile") < COMPILE_NEEDS:
        check.skip("gpu_step_compile", f"{check.limit('gpu_step_compile'):.0f} s of the budget "
                                       f"left, compiling needs about {COMPILE_NEEDS} s or more")
    else:
        step_gpu_step(check, "gpu_step_compile", ["channels_last+compile"])


def run_steps(check: Check) -> None:
    """Every step in order; compiling goes last, in whatever time is left."""
    step_environment(check)
    step_gpu_step(check, "gpu_step", ["eager", "channels_last"] if check.smoke
                  else ["eager", "bf16", "channels_last"])
    killed = step_run_killed(check)
    if killed:
        step_resume(check, killed)
    else:
        check.skip("resume", "no killed run to resume")
    nproc_run = step_nproc(check)
    if nproc_run or killed:
        step_evaluate_predict(check, nproc_run or killed)
    else:
        for name in ("evaluate", "predict"):
            check.skip(name, "no trained run")
    step_compile(check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter with ptxlab")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU")
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything")
    parser.add_argument("--started", type=float, default=time.time(), help="epoch seconds")
    parser.add_argument("--install", type=json.loads, default=None,
                        help="the install step's record, as JSON (from gpu_check.sh)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ptxlab-gpu-check-") as work:
        check = Check(args, Path(work))
        if args.install:
            check.report["steps"].append(args.install)
        if not args.install or args.install["status"] != "fail":
            run_steps(check)
    report = check.report
    failed = [step["name"] for step in report["steps"] if step["status"] == "fail"]
    report.update(passed=not failed, failed_steps=failed,
                  wall_s=round(time.time() - args.started, 1))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
