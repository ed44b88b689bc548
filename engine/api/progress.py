"""A running job's progress in the store, and whether it is still wanted: what the API shows while a job is
PENDING (`refgen.progress`, GET /generations/{id}/events) and how deleting a running job stops it."""

from __future__ import annotations

import time
from typing import Any

from .store import AssetStore

PROGRESS_SECONDS = 0.25  # at most this often progress is written (and the job's deletion looked for)


class JobProgress:
    def __init__(self, store: AssetStore, job_id: str, every: float = PROGRESS_SECONDS):
        self.store, self.job_id, self.every = store, job_id, every
        self.written = self.checked = 0.0
        self.deleted = False

    def report(self, progress: dict[str, Any], last: bool = False) -> None:
        """Record `progress` unless one was written less than `every` seconds ago (the last one is always tried;
        a write that would wait for another writer is skipped, see AssetStore.set_progress)."""
        now = time.monotonic()
        if last or now - self.written >= self.every:
            self.written = now
            self.store.set_progress(self.job_id, progress)

    def wanted(self) -> bool:
        """False once the job's row is gone (DELETE of the generation, element or model): stop it."""
        now = time.monotonic()
        if not self.deleted and now - self.checked >= self.every:
            self.checked = now
            self.deleted = not self.store.job_exists(self.job_id)
        return not self.deleted

    def on_generation_step(self, info) -> bool:
        """Engine.generate's on_step: {"step", "total", "phase"} (1-based step; the base pass, then quality mode's
        refine pass); returning False cancels the generation."""
        step = info.step + 1
        self.report({"step": step, "total": info.total, "phase": info.phase}, last=step == info.total)
        return self.wanted()
