"""Prefect in the world: ``prefect server start`` (its own home and database) in cloud, a
process work pool and the project's deployments made by ``prefect deploy`` from its
prefect.yaml, and ``prefect worker start`` in user from the project's wheel installed in
a venv of its own (no checkout on its path)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deploykit import Served, build_wheel, installed_venv
from world.netns import CLOUD, World, world_env

__all__ = ["API_URL", "POOL", "PrefectWorld"]

PORT = 4200
API_URL = f"http://{CLOUD}:{PORT}/api"
POOL = "scistream"
REPO = Path(__file__).resolve().parents[2]

# Polls the API's health endpoint from inside a namespace until it answers.
_HEALTHY = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
            if reply.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("no answer from " + sys.argv[1])
    time.sleep(0.5)
"""


class PrefectWorld:
    """The server, the pool, the deployments and a worker; ``start()`` / ``stop()``.

    ``root`` holds the server's PREFECT_HOME, the wheel's venv, the worker's empty
    working directory and the logs. ``user_env`` is added to the environment of every
    process of the user's (the worker, its flow runs, :meth:`python`)."""

    def __init__(self, world: World, root: Path, user_env: dict | None = None):
        self.world, self.root = world, root
        self.user_env = user_env or {}
        self.server: Served | None = None
        self.worker: Served | None = None
        self.bin: Path | None = None

    def env(self, **extra: str) -> dict:
        """A Prefect client's environment in the world: this API, no analytics, generous
        start-up timeouts (two cores, shared), and none of this process's PREFECT_*."""
        env = {k: v for k, v in world_env().items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=API_URL, PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_HOME=str(self.root / "client-home"),
                   PREFECT_API_REQUEST_TIMEOUT="120")
        env.update(self.user_env, **extra)
        return env

    def start(self) -> PrefectWorld:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        home = self.root / "server-home"
        home.mkdir(mode=0o700, exist_ok=True)
        server_env = {k: v for k, v in world_env().items() if not k.startswith("PREFECT_")}
        server_env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                          PREFECT_SERVER_API_HOST=CLOUD, PREFECT_SERVER_API_PORT=str(PORT))
        self.server = Served([*self.world.argv_prefix("cloud"), sys.executable, "-m", "prefect",
                              "server", "start", "--no-ui", "--host", CLOUD, "--port",
                              str(PORT)], self.root / "server.log", env=server_env)
        # The wheel is built and installed while the server starts.
        self.bin = installed_venv(self.root / "venv", build_wheel(self.root / "dist"))
        self._wait_healthy()
        self.prefect("work-pool", "create", POOL, "--type", "process", "--overwrite")
        self.prefect("deploy", "--all", "--prefect-file", str(REPO / "prefect.yaml"))
        outside = self.root / "worker-cwd"
        outside.mkdir(exist_ok=True)
        self.worker = Served([*self.world.argv_prefix("user"), str(self.bin / "python"), "-m",
                              "prefect", "worker", "start", "--pool", POOL],
                             self.root / "worker.log", cwd=outside,
                             env=self.env(PREFECT_WORKER_QUERY_SECONDS="1"))
        return self

    def _wait_healthy(self, timeout_s: float = 300) -> None:
        done = self.world.run("user", [sys.executable, "-c", _HEALTHY, f"{API_URL}/health",
                                       str(timeout_s)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{done.stderr.strip()}; server log:\n{self.server.tail()}")

    def prefect(self, *args: str) -> str:
        """The installed ``prefect`` command, run in user from an empty directory."""
        cwd = self.root / "deploy-cwd"
        cwd.mkdir(exist_ok=True)
        done = self.world.run("user", [str(self.bin / "python"), "-m", "prefect",
                                       "--no-prompt", *args], cwd=cwd, env=self.env(),
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"prefect {' '.join(args)}: {done.stdout[-2000:]}"
                               f"{done.stderr[-3000:]}")
        return done.stdout

    def python(self, code: str, *args: str, timeout_s: float = 900, **env: str) -> dict:
        """Run ``code`` with the installed package's Python in user; it prints one JSON
        line last, returned."""
        done = self.world.run("user", [str(self.bin / "python"), "-c", code, *args],
                              cwd=self.root / "deploy-cwd", env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode:
            raise RuntimeError(f"{done.stdout[-2000:]}{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        for served in (self.worker, self.server):
            if served is not None:
                served.stop()
        self.worker = self.server = None

    def __enter__(self) -> PrefectWorld:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def installed_origin(prefect: PrefectWorld) -> str:
    """Where the worker's Python imports scistream_prefect from."""
    return prefect.python("import json, scistream_prefect as s; "
                          "print(json.dumps({'file': s.__file__}))")["file"]

