"""What the bad-input tests share: the stream's hello key and app, hypothesis's settings,
and a gateway's whole state to compare before and after a refused input."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from hypothesis import HealthCheck, settings

KEY = "the-right-hello-key"
APP = "127.0.0.1:5074"
EXAMPLES = int(os.environ.get("SCISTREAM_BAD_INPUT_EXAMPLES", "40"))
HYPOTHESIS = settings(max_examples=EXAMPLES, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


def dump_state(state_dir: Path) -> dict:
    """Everything a gateway keeps: its tables and every other file in its state dir."""
    with sqlite3.connect(state_dir / "state.sqlite3") as db:
        tables = {name: db.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
                  for name in ("streams", "ports")}
    files = {}
    for path in sorted(state_dir.rglob("*")):
        if path.name.startswith("state.sqlite3"):
            continue  # compared as tables above (WAL checkpoints move bytes around)
        info = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        files[str(path.relative_to(state_dir))] = (info.st_mode, info.st_size, content)
    return {"tables": tables, "files": files}
