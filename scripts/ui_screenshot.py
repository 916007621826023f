"""Screenshots of a stream's flow runs as the Prefect UI draws them, for docs/client.md.

Starts a real ``prefect server start`` on loopback (its own PREFECT_HOME and SQLite
database in a temporary directory, analytics off), runs the open-stream and
release-stream flows against it between two local gateways (a producer app sends data
that a consumer app reads through the stream), photographs the open-stream run's pages
with headless Chromium, checks that each page drew the run (its name is in the page),
and stops everything it started however it ends::

    .venv/bin/python scripts/ui_screenshot.py            # writes docs/img/*.png
    .venv/bin/python scripts/ui_screenshot.py --out DIR

Needs ``chromium`` on PATH (Debian: ``apt-get install chromium``); exits 2 without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
WINDOW = (1400, 1100)
# Pages of Prefect's current UI (the one its "/" opens; a path without /v2 is the
# older UI's), with a text each page shows once drawn (the log page: a log line).
PAGES = {
    "open-stream-logs.png": ("/v2/runs/flow-run/{open_run}?tab=Logs",
                             "Beginning flow run '{run_name}'"),
    "stream-listeners.png": ("/v2/artifacts/artifact/{listeners_artifact}", "{listener}"),
    "stream-summary.png": ("/v2/artifacts/artifact/{summary_artifact}", "setup time"),
}
SERVER_START_S = 180.0  # a fresh server migrates its database first; slow on a busy machine
SETTLE_S = 60.0  # for the server to record the task runs' final states from their events
CHROMIUM_S = 120.0


class ScreenshotError(Exception):
    """A step failed; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with its own session, and everything it started."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _get_json(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def _wait_for_server(server: subprocess.Popen, api: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"prefect server exited ({server.returncode}):\n"
                                  + log.read_text()[-3000:])
        try:
            if _get_json(f"{api}/health") is True:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise ScreenshotError(f"prefect server did not answer at {api}/health within "
                          f"{SERVER_START_S:.0f} s:\n" + log.read_text()[-3000:])


def _run_flows(work: Path, port_base: int) -> dict[str, str]:
    """Open a stream, move data through it, release it; return what names the pages:
    both flow runs' ids, the open-stream run's name, the stream's uid and a listener."""
    # Imported here: Prefect reads PREFECT_HOME and PREFECT_API_URL when first imported.
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    from scistream_prefect import LocalPair
    from scistream_prefect.flows.streams import open_stream, release_stream
    from scistream_proxy import apps

    num_conn, total_bytes = 2, 64 << 20
    with LocalPair.create(work / "gateways", name="ui-shot", port_base=port_base,
                          ports=10) as pair:
        pair.warm_up()
        producer_app, app_listeners = apps.start_producer(num_conn, total_bytes)
        try:
            opened = open_stream(pair.producer, pair.consumer, num_conn=num_conn,
                                 app_listeners=app_listeners, return_state=True)
            handle = opened.result()
            consumer_app = subprocess.run([*apps.COMMAND, "consumer", *handle.listeners],
                                          capture_output=True, text=True, timeout=120)
            received = sum(r.get("bytes", 0) for r in apps.connection_results(consumer_app.stdout))
            if received != total_bytes:
                raise ScreenshotError(f"the consumer app read {received} of {total_bytes} "
                                      f"bytes:\n{consumer_app.stderr[-2000:]}")
            released = release_stream(pair.producer, pair.consumer, handle.uid,
                                      return_state=True)
            released.result()
        finally:
            if producer_app.poll() is None:
                producer_app.kill()
            producer_app.wait()
        if left := pair.leftovers():
            raise ScreenshotError(f"the gateways still hold {left}")
    # Send what the flows logged and the task runs' events before the pages are drawn.
    APILogWorker.drain_all()
    EventsWorker.drain_all()
    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(opened.state_details.flow_run_id).name
    return {"open_run": str(opened.state_details.flow_run_id),
            "release_run": str(released.state_details.flow_run_id),
            "run_name": run_name, "uid": handle.uid, "listener": handle.listeners[0]}


def _wait_until_recorded(api: str, run_ids: list[str]) -> None:
    """Wait until the server has every task run of the runs in a final state (it records
    them from events, after the flows returned), the same number twice in a row."""
    deadline, last = time.monotonic() + SETTLE_S, None
    body = {"flow_runs": {"id": {"any_": run_ids}}}
    while time.monotonic() < deadline:
        runs = _get_json(f"{api}/task_runs/filter", body)
        final = [r for r in runs if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED",
                                                         "CANCELLED")]
        count = len(runs) if runs and len(final) == len(runs) else None
        if count is not None and count == last:
            return
        last = count
        time.sleep(1.0)
    raise ScreenshotError(f"the server did not record the task runs of {run_ids} within "
                          f"{SETTLE_S:.0f} s")


def _artifact_id(api: str, key: str, flow_run: str) -> str:
    """The id of the version of artifact ``key`` that ``flow_run`` made last."""
    found = _get_json(f"{api}/artifacts/filter", {
        "artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run]}},
        "sort": "CREATED_DESC", "limit": 1})
    if not found:
        raise ScreenshotError(f"the server has no artifact {key} of run {flow_run}")
    return found[0]["id"]


def _chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium in its own session (so a timeout stops its helpers too)."""
    command = [binary, "--headless=new", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", "--disable-background-networking",
               f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
               # The UI is a single-page app: give it virtual time to fetch and draw.
               "--virtual-time-budget=15000", *args]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with it
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_S)
    except subprocess.TimeoutExpired:
        raise ScreenshotError(f"chromium took more than {CHROMIUM_S:.0f} s on {args[-1]}") from None
    finally:
        _stop_group(proc)
    if proc.returncode != 0:
        raise ScreenshotError(f"chromium failed ({proc.returncode}) on {args[-1]}:\n"
                              + err[-2000:])
    return out


def _photograph(binary: str, profile: Path, ui: str, names: dict[str, str],
                out: Path) -> list[Path]:
    written = []
    for file_name, (path, expected) in PAGES.items():
        url, expected = ui + path.format(**names), expected.format(**names)
        png = out / file_name
        png.unlink(missing_ok=True)
        dom = _chromium(binary, profile, "--dump-dom", f"--screenshot={png}", url)
        if not png.is_file():
            raise ScreenshotError(f"chromium wrote no screenshot of {url}")
        if expected not in dom:
            png.unlink()
            raise ScreenshotError(f"the page at {url} does not show {expected!r}: the UI "
                                  "did not draw it")
        written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS_IMG,
                        help=f"where the PNGs go (default: {DOCS_IMG})")
    parser.add_argument("--port-base", type=int, default=16700,
                        help="first of the 20 ports the two local gateways use")
    parser.add_argument("--chromium", default="chromium",
                        help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    binary = shutil.which(args.chromium)
    if binary is None:
        print(f"{args.chromium} not found: install Chromium (Debian: apt-get install "
              "chromium) or name it with --chromium", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the server and the gateways are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="scistream-ui-shot-"))
    port = _free_port()
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    os.environ.update({"PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api,
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"})
    log = work / "server.log"
    server = None
    try:
        with log.open("w") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        _wait_for_server(server, api, log)
        names = _run_flows(work, args.port_base)
        _wait_until_recorded(api, [names["open_run"], names["release_run"]])
        for name, key in (("listeners_artifact", "scistream-listeners"),
                          ("summary_artifact", "scistream-stream")):
            names[name] = _artifact_id(api, f"{key}-{names['uid']}", names["open_run"])
        args.out.mkdir(parents=True, exist_ok=True)
        for png in _photograph(binary, work / "chromium", ui, names, args.out):
            print(png)
    except ScreenshotError as exc:
        print(f"ui_screenshot: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            _stop_group(server)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
