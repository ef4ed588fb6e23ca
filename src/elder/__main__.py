"""`python -m elder` runs the command line."""

from elder.cli import app

app()
