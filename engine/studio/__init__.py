"""refgen studio: the web page `refgen serve` shows at `/`, a client of the public HTTP API (engine/api/server.py).

Plain ES modules, CSS and screenshots under static/, served as files: no build step, nothing loaded from
outside this server (the server's Content-Security-Policy allows only its own origin).
"""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
