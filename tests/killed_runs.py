"""A real process SIGKILLed mid-run: the resume tests of `refgen batch` (locally and on Ray) use it."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def kill_after_pngs(command: list[str], folder: Path, count: int = 3, env: Optional[dict] = None,
                    seconds: float = 120) -> dict[str, bytes]:
    """Run `command`, SIGKILL it once `folder` holds `count` PNGs, and return those PNGs' bytes by name. Fails when
    the process ended on its own first (then nothing was interrupted)."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + seconds
    while len(list(folder.glob("*.png"))) < count and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr.decode()[-2000:]}"
    return {path.name: path.read_bytes() for path in folder.glob("*.png")}
