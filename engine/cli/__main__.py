"""`python -m engine.cli ...` is `refgen ...`."""

from .main import app

app(prog_name="refgen")
