"""`refgen batch`: run a manifest of requests, resumably (the library: engine/batch/)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .error_lines import refgen_errors


def batch(
    manifest: Annotated[Path, typer.Argument(help="JSONL (refgen requests or Leonardo bodies), CSV, or a template (.json/.toml).", dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs and results.jsonl (created if missing); rerun into it to resume.", file_okay=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Model for lines that name none: manifest name, folder, cached repo id, .safetensors file, or 'tiny'.")] = "sdxl-base",
    format: Annotated[Optional[str], typer.Option("--format", help="jsonl, leonardo (every line a Leonardo body), csv or template (default: from the file's extension).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU).")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run the units on Ray actors, one per GPU (or CPU slot), each holding one loaded model. Needs the ray extra: pip install 'refgen\\[ray]'.")] = False,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="With --ray: an existing cluster ('auto', HOST:6379, ray://HOST:10001; default: a local cluster for this run).")] = None,
    ray_actors: Annotated[Optional[int], typer.Option("--ray-actors", min=1, help="With --ray: how many actors (default: one per GPU of the cluster, else one per CPU).")] = None,
) -> None:
    """Run every line of a manifest; outputs are named by each line's id, so rerunning resumes.

    \b
    Examples:
      refgen batch npcs.jsonl --out out/npcs                  # rerun the same command to resume
      refgen batch campaign.csv --out out/campaign --model my-xl.safetensors
      refgen batch variants.toml --out out/variants --model tiny   # template: one request x prompts/seeds
      refgen batch npcs.jsonl --out out/npcs --ray                          # every GPU here, one Ray actor each
      refgen batch npcs.jsonl --out /shared/npcs --ray --ray-address auto   # the Ray cluster this node is in
    Each line gets <out>/<id>-<n>.png and a record in <out>/results.jsonl; exit code 1 when a line failed.
    """
    from ..batch import read_manifest, run_batch

    if (ray_address or ray_actors) and not ray:
        raise typer.BadParameter("--ray-address and --ray-actors go with --ray", param_hint="--ray")
    with refgen_errors(tiny_model=model != "tiny"):  # main.py quiets the libraries (MODEL_COMMANDS)
        runner = _ray_runner(ray_address, ray_actors, device, dtype) if ray else None
        plan = read_manifest(manifest, model=model, format=format, characters=_character_digest)
        console = Console(stderr=True)
        with _progress(console) as progress:
            lines = progress.add_task("lines", total=len(plan.lines))
            images = progress.add_task("images", total=plan.images_total)

            def on_record(record, written: int) -> None:
                progress.advance(lines)
                progress.advance(images, len(record.seeds))  # a line's images, made, found or failed
                if record.status == "failed":
                    progress.console.print(f"[red]line {record.line}:[/red] {escape(record.error or 'failed')}", soft_wrap=True)

            summary = run_batch(plan, out, lambda name: _load(name, device, dtype, console), on_record=on_record, runner=runner)
    typer.echo(f"done {summary.done}, skipped {summary.skipped}, failed {summary.failed} "
               f"({summary.images_written} images written; results: {summary.results})")
    if summary.failed:
        raise typer.Exit(code=1)


def _ray_runner(address: Optional[str], actors: Optional[int], device: Optional[str], dtype: Optional[str]):
    """The Ray runner (engine/batch/distributed.py); RayUnavailableError naming the extra when ray is missing."""
    from ..batch.distributed import RayUnits, import_ray

    import_ray()
    return RayUnits(address=address, actors=actors, device=device, dtype=dtype)


def _load(model: str, device: Optional[str], dtype: Optional[str], console: Console):
    from .. import Engine

    with console.status(f"loading {model} ..."):
        return Engine.load(model, device, dtype)


def _character_digest(name: str) -> str:
    """A saved character's identity for line ids: sha256 of its profile (UnknownCharacterError when there is none)."""
    from adapters.characters import PROFILE_FILE, CharacterStore

    store = CharacterStore()
    store.get(name)
    return hashlib.sha256((store.folder(name) / PROFILE_FILE).read_bytes()).hexdigest()


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)
