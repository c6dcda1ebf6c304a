"""The `ptxlab` command line. Each module here parses arguments and calls one function; no logic."""

import typer

app = typer.Typer(
    name="ptxlab",
    help="Pneumothorax segmentation experiments: train, sweep, evaluate, predict; tracked in MLflow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

# Command groups register themselves below, one line each.
from ptxlab.cli import run as _run  # noqa: E402

app.command("run")(_run.run)
app.command("ui")(_run.ui)
app.add_typer(_run.config_app, name="config")
from ptxlab.cli import data as _data  # noqa: E402

app.add_typer(_data.app, name="data")
from ptxlab.cli import weights as _weights  # noqa: E402

app.add_typer(_weights.app, name="weights")
from ptxlab.cli import augment as _augment  # noqa: E402

app.add_typer(_augment.app, name="augment")
from ptxlab.cli import evaluate as _evaluate  # noqa: E402

app.command("evaluate")(_evaluate.evaluate)
app.command("predict")(_evaluate.predict)
from ptxlab.cli import sweep as _sweep  # noqa: E402

app.command("sweep")(_sweep.sweep)
app.command("report")(_sweep.report)
