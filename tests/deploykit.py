"""What deployment tests share: a served ``scistream serve`` (or another serving script,
or a ``prefect worker``) pointed at the test harness's API, and waiting for what the API
shows."""

from __future__ import annotations

import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client


def prefect_env() -> dict:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())


REPO = Path(__file__).resolve().parent.parent


def build_wheel(dist: Path) -> Path:
    """The project's wheel, built from a copy of the checkout (which gets no build/)."""
    source = dist.parent / "wheel-source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", "bench_results*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(dist), str(source)], check=True, capture_output=True)
    shutil.rmtree(source)
    (wheel,) = dist.glob("scistream_prefect-*.whl")
    return wheel


def installed_venv(where: Path, wheel: Path) -> Path:
    """A venv with ``wheel`` installed (not editable); returns its bin directory.

    Its dependencies are this interpreter's, reached through a path file (no index,
    no download): that directory's own path files are not read, so the checkout's
    editable install stays out, and the venv's own site-packages come first."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; "
                          "print(sysconfig.get_path('purelib'))"], check=True,
                         capture_output=True, text=True).stdout.strip()
    Path(own, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return where / "bin"


def wait_for(predicate, what: str, timeout: float = 180.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"gave up waiting for {what}")


def read_deployment(name: str):
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not there yet
            return None


class Served:
    """A serving subprocess, stopped (SIGINT, then its process group) afterwards."""

    def __init__(self, argv: list[str], log: Path, cwd: Path | None = None,
                 env: dict | None = None):
        self.log = log
        # TMPDIR: Prefect's runner keeps a directory per run under the temp dir
        # (runner_storage/); this keeps those in the test's own directory.
        # PYTHONUNBUFFERED: what the runner logs is in the file when it happens.
        env = dict(env or prefect_env(), TMPDIR=str(log.parent), PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=cwd, start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def forget_deployments(*names: str) -> None:
    """So a wait for a deployment sees this test's, not one an earlier test left."""
    with get_client(sync_client=True) as client:
        for name in names:
            deployment = read_deployment(name)
            if deployment is not None:
                client.delete_deployment(deployment.id)


@pytest.fixture(name="served_scistream")
def served_scistream_fixture(tmp_path):
    """``scistream serve`` running, its two deployments registered."""
    forget_deployments("open-stream/scistream", "release-stream/scistream")
    served = Served([sys.executable, "-m", "scistream_prefect.cli", "serve"],
                    tmp_path / "serve.log")
    try:
        wait_for(lambda: served.proc.poll() is not None or (read_deployment("open-stream/scistream")
              and read_deployment("release-stream/scistream")), "the served deployments")
        assert served.proc.poll() is None, served.tail()
        yield served
    finally:
        served.stop()
