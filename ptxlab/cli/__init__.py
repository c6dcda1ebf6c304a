"""The `ptxlab` command line. Each module here parses arguments and calls one function; no logic."""

import typer

from ptxlab.cli import augment, config, data, evaluate, gc, predict, report, run, sweep, ui, weights
from ptxlab.cli.errors import fail_cleanly
from ptxlab.compat import check_torch_pair

app = typer.Typer(
    name="ptxlab",
    help="Pneumothorax segmentation experiments: train, sweep, evaluate, predict; tracked in MLflow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def check_installation() -> None:
    """Pneumothorax segmentation experiments: train, sweep, evaluate, predict; tracked in MLflow."""
    with fail_cleanly():
        check_torch_pair()


app.command("run")(run.run)
app.command("sweep")(sweep.sweep)
app.command("report")(report.report)
app.command("evaluate")(evaluate.evaluate)
app.command("predict")(predict.predict)
app.command("ui")(ui.ui)
app.command("gc")(gc.gc)
app.add_typer(config.app, name="config")
app.add_typer(data.app, name="data")
app.add_typer(weights.app, name="weights")
app.add_typer(augment.app, name="augment")
