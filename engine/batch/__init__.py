"""Batch runs: a manifest of requests -> PNGs named by each line's stable id, a results file, resume.

    from engine.batch import read_manifest, run_batch
    manifest = read_manifest("npcs.jsonl", model="sdxl-base")      # every line parsed, bad ones kept with their error
    summary = run_batch(manifest, "out/npcs", load_engine=lambda model: Engine.load(model))
    summary.failed                                                  # lines that failed (their errors are in results.jsonl)

Formats and ids: engine/batch/manifest.py. Grouping and batching: engine/batch/plan.py. The loop, resume and the
results file: engine/batch/run.py. On a Ray cluster (the optional extra, imported only there):
engine/batch/distributed.py, `run_batch_on_ray(manifest, out, address=None, actors=None)`.
"""

from .manifest import FORMATS, BatchLine, Manifest, ManifestError, read_manifest
from .plan import MAX_MERGED_IMAGES, WorkUnit, plan_batch
from .run import RESULTS_FILE, BatchSummary, LineRecord, read_results, run_batch

__all__ = [
    "FORMATS", "BatchLine", "Manifest", "ManifestError", "read_manifest", "MAX_MERGED_IMAGES", "WorkUnit", "plan_batch",
    "RESULTS_FILE", "BatchSummary", "LineRecord", "read_results", "run_batch",
]
