"""scripts/ui_screenshot.py photographs a real run in a real Prefect server's UI.
Ports 16720-16739."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

SCRIPT = Path(__file__).parent.parent / "scripts" / "ui_screenshot.py"
FILES = ["open-stream-logs.png", "stream-listeners.png", "stream-summary.png"]


@pytest.fixture
def tmp():
    """A short temporary directory: Chromium's socket path in it has a length limit."""
    path = Path(tempfile.mkdtemp(prefix="uishot-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the script with its temporary files under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=900, env={**env, "TMPDIR": str(tmp)})


def _processes_under(tmp: Path) -> list[int]:
    """Processes whose environment names ``tmp`` (the server's PREFECT_HOME, the
    gateways' workers and relays, chromium)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if str(tmp).encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_without_chromium_it_says_what_to_install(tmp_path, tmp):
    proc = _run(tmp, "--out", str(tmp_path / "img"), "--chromium",
                "no-such-chromium")
    assert proc.returncode == 2
    assert "no-such-chromium not found" in proc.stderr and "apt-get install chromium" in proc.stderr
    assert not (tmp_path / "img").exists() and list(tmp.iterdir()) == []


@pytest.mark.slow
def test_screenshots_show_the_run(tmp_path, tmp):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out = tmp_path / "img"
    proc = _run(tmp, "--out", str(out), "--port-base", "16720")
    # The script fails unless each page's DOM shows the run (its log line, a listener,
    # the summary): what is checked here is that it wrote real, drawn images.
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(out / name) for name in FILES]
    for name in FILES:
        pixels = image.imread(out / name)
        assert pixels.shape[:2] == (1100, 1400), name
        colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
        # A heading alone on a white page has ~140 colours (anti-aliasing); these ~1500+.
        assert len(colours) > 500, f"{name} is nearly blank: {len(colours)} colours"
    # Server, gateways, apps and chromium stopped; their files gone.
    assert _processes_under(tmp) == [] and list(tmp.iterdir()) == []
