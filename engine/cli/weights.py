"""`refgen weights list | fetch NAME... | verify [NAME] | convert NAME`.

Mounted by the main CLI with `app.add_typer(weights_app, name="weights")`. Errors refgen raises
on purpose (RefgenError) become one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine import paths, weights
from engine.cli.error_lines import fail as _fail
from engine.cli.error_lines import refgen_errors as _refgen_errors
from engine.errors import WeightsDownloadError

weights_app = typer.Typer(
    help="List, fetch and verify the model weights named in weights/manifest.toml.",
    no_args_is_help=True,
)

WeightsDirOption = Annotated[
    Optional[Path],
    typer.Option(
        "--weights-dir", help="Weights folder (default: $REFGEN_WEIGHTS or <checkout>/weights).", file_okay=False
    ),
]
ManifestOption = Annotated[
    Optional[Path],
    typer.Option(
        "--manifest", help="Manifest file (default: $REFGEN_MANIFEST or weights/manifest.toml).", dir_okay=False
    ),
]

STATUS_STYLE = {"ok": "green", "unverified": "yellow", "missing": "red", "mismatch": "bold red"}


@weights_app.command("list")
def list_weights(weights_dir: WeightsDirOption = None, manifest: ManifestOption = None) -> None:
    """Show every component of the manifest and whether its files are on disk.

    \b
    Examples:
      refgen weights list
      refgen weights list --weights-dir /data/refgen-weights
    """
    with _refgen_errors():
        loaded = weights.Manifest.load(manifest)
        table = Table(title=f"weights in {weights_dir or paths.weights_dir()}")
        for column in ("name", "kind", "license", "size", "status"):
            table.add_column(column, no_wrap=True)
        table.add_column("folder", overflow="fold")
        for entry in loaded.entries:
            table.add_row(
                entry.name,
                entry.kind,
                entry.license,
                weights.human_size(entry.total_size),
                _presence(entry, weights_dir),
                str(entry.folder(weights_dir)),
            )
        Console().print(table)


def _presence(entry: weights.ManifestEntry, weights_dir: Path | None) -> str:
    missing = len(weights.missing_files(entry, weights_dir))
    if missing == 0:
        return "[green]present[/green]"
    if missing == len(entry.files):
        return "[red]missing[/red]"
    return f"[yellow]missing {missing}/{len(entry.files)}[/yellow]"


@weights_app.command("fetch")
def fetch_weights(
    names: Annotated[list[str], typer.Argument(help="Component names from the manifest (see `refgen weights list`).")],
    weights_dir: WeightsDirOption = None,
    manifest: ManifestOption = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show download and hashing progress bars.")
    ] = True,
) -> None:
    """Download components from the Hugging Face hub and check every file's sha256.

    \b
    Examples:
      refgen weights fetch sdxl-base
      refgen weights fetch controlnet-canny-sdxl realesrgan-x4plus
      refgen weights fetch sdxl-base --weights-dir /data/refgen-weights --no-progress
    """
    with _refgen_errors():
        loaded = weights.Manifest.load(manifest)
        entries = [loaded.get(name) for name in names]  # every name checked before any download
        for number, entry in enumerate(entries):
            try:
                weights.fetch(entry, weights_dir, progress=progress)
            except WeightsDownloadError as exc:
                _fail(exc.describe(also_missing=_not_attempted(entries[number + 1 :], weights_dir)))
    Console().print(f"[green]fetched:[/green] {escape(', '.join(names))}")


def _not_attempted(entries: list[weights.ManifestEntry], weights_dir: Path | None) -> list[str]:
    """The other components asked for that are not on disk either (the fetch stopped before them)."""
    return [weights.still_missing(entry, weights_dir) for entry in entries if weights.missing_files(entry, weights_dir)]


@weights_app.command("convert")
def convert_weights(
    name: Annotated[str, typer.Argument(help="A component with pickled .bin files (ip-adapter-faceid-plusv2-sdxl, instantid).")],
    weights_dir: WeightsDirOption = None,
    manifest: ManifestOption = None,
) -> None:
    """Convert a component's published .bin pickles to .safetensors once (hash-checked first), so the
    engine loads them without --allow-pickle.

    \b
    Examples:
      refgen weights convert instantid
      refgen weights convert ip-adapter-faceid-plusv2-sdxl --weights-dir /data/refgen-weights
    """
    with _refgen_errors():
        written = weights.convert_pickles(weights.Manifest.load(manifest).get(name), weights_dir, progress=True)
    if not written:
        _fail(f"{name} has no .bin files to convert")
    for path in written:
        Console().print(f"[green]converted:[/green] {escape(str(path))}")


@weights_app.command("verify")
def verify_weights(
    name: Annotated[Optional[str], typer.Argument(help="One component; all of them when left out.")] = None,
    weights_dir: WeightsDirOption = None,
    manifest: ManifestOption = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show hashing progress bars.")] = False,
) -> None:
    """Re-hash the files on disk; exit 1 when any is missing or does not match.

    \b
    Examples:
      refgen weights verify
      refgen weights verify sdxl-base --progress
    """
    with _refgen_errors():
        loaded = weights.Manifest.load(manifest)
        entries = [loaded.get(name)] if name else list(loaded.entries)
        results = {entry.name: weights.verify(entry, weights_dir, progress=progress) for entry in entries}
    console = Console()
    console.print(_verify_table(results))
    failing = [entry for entry, checks in results.items() if any(c.failed for c in checks)]
    for entry in failing:
        console.print(f"[red]{escape(entry)}[/red]: not usable; fetch it with: refgen weights fetch {escape(entry)}")
    if failing:
        raise typer.Exit(code=1)


def _verify_table(results: dict[str, list[weights.FileCheck]]) -> Table:
    table = Table(title="weights verify")
    table.add_column("component", no_wrap=True)
    table.add_column("file", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("expected", no_wrap=True)
    table.add_column("actual", no_wrap=True)
    for entry, checks in results.items():
        for check in checks:
            style = STATUS_STYLE[check.status]
            table.add_row(
                entry,
                check.path,
                f"[{style}]{check.status}[/{style}]",
                _short(check.expected),
                _short(check.actual),
            )
    return table


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"
