"""`python -m ptxlab` is the `ptxlab` command."""

from ptxlab.cli import app

app()
