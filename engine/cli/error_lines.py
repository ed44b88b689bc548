"""The CLI's one error handler.

Errors refgen raises on purpose (RefgenError) and invalid requests (pydantic's ValidationError)
become one `error: ...` line on stderr and exit code 1, never a traceback. Every command wraps its
body in `refgen_errors()`; a command that builds a request passes the map from request fields to
its own options, so a message names the flag the user typed (`--n`), not the library field, and a
command with a `--model` option says so, so a missing-weights message may offer `--model tiny`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from ..errors import RefgenError, WeightsMissingError


def fail(message: str) -> NoReturn:
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=1)


@contextmanager
def refgen_errors(flags: Optional[Mapping[str, str]] = None, tiny_model: bool = False) -> Iterator[None]:
    """`flags`: request field (dotted for nested ones, e.g. `character.weight`) -> the command's option.
    `tiny_model`: the command takes `--model tiny`, the offline way out of missing weights."""
    try:
        yield
    except ValidationError as exc:
        fail(validation_message(exc, flags or {}))
    except WeightsMissingError as exc:
        fail(exc.describe(offer_tiny=tiny_model))
    except RefgenError as exc:
        fail(str(exc))


def validation_message(exc: ValidationError, flags: Mapping[str, str]) -> str:
    parts = []
    for error in exc.errors():
        where = _where(error["loc"], flags)
        message = _with_flags(error["msg"].removeprefix("Value error, "), flags)
        parts.append(f"{where}: {message}" if where else message)
    return "invalid options -- " + "; ".join(parts)


def _where(loc: tuple, flags: Mapping[str, str]) -> str:
    """('controlnets', 0, 'weight') -> '--control #1 (weight)'; unmapped fields keep their dotted name."""
    names = [str(part) for part in loc if not isinstance(part, int)]
    index = next((part for part in loc if isinstance(part, int)), None)
    for end in range(len(names), 0, -1):
        flag = flags.get(".".join(names[:end]))
        if flag:
            number = f" #{index + 1}" if index is not None else ""
            rest = f" ({'.'.join(names[end:])})" if names[end:] else ""
            return flag + number + rest
    return ".".join(str(part) for part in loc)


def _with_flags(message: str, flags: Mapping[str, str]) -> str:
    """Field names in a message (`best_of needs ...`) -> flags; only snake_case names, which are never plain words."""
    for field, flag in flags.items():
        name = field.rpartition(".")[2]
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", flag, message)
    return message
