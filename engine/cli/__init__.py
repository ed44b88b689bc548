"""refgen's command line (typer), a thin front-end over the library: `refgen = engine.cli:app`."""

from .main import app

__all__ = ["app"]
