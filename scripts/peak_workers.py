"""Run a command and report the peak number of gateway worker processes it kept alive.

    .venv/bin/python scripts/peak_workers.py [--interval 0.2] -- .venv/bin/python -m pytest ...

Counts the ``scistream_gateway.local_worker`` processes below the command (other users'
workers on a shared machine do not count), their summed RSS, and the machine's used
memory (MemTotal - MemAvailable, which other work on the machine moves too). Prints one
JSON line on stderr at the end; exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from scistream_proxy import procfs

WORKER = b"scistream_gateway.local_worker"


def _processes() -> dict[int, tuple[int, list[bytes]]]:
    """pid -> (parent pid, argv) of every process readable now."""
    found = {}
    for pid in procfs.pids():
        fields = procfs.stat(pid)
        if fields is not None:
            found[pid] = (int(fields[1]), procfs.cmdline(pid))
    return found


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _used_memory_kib() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key] = int(value.split()[0])
    return info["MemTotal"] - info["MemAvailable"]


def sample(root: int) -> tuple[int, int]:
    """(worker count, their RSS in KiB) among ``root``'s descendants."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    workers, todo, seen = [], [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
        if pid in processes and WORKER in processes[pid][1]:
            workers.append(pid)
    return len(workers), sum(_rss_kib(pid) for pid in workers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    peak = {"workers": 0, "workers_rss_mib": 0.0, "used_memory_mib": 0.0}
    baseline = _used_memory_kib()
    started = time.monotonic()
    proc = subprocess.Popen(command)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(args.interval):
            count, rss = sample(proc.pid)
            peak["workers"] = max(peak["workers"], count)
            peak["workers_rss_mib"] = max(peak["workers_rss_mib"], round(rss / 1024, 1))
            peak["used_memory_mib"] = max(peak["used_memory_mib"],
                                          round(_used_memory_kib() / 1024, 1))

    sampler = threading.Thread(target=run, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    print(json.dumps({"peak": peak, "used_memory_mib_before": round(baseline / 1024, 1),
                      "seconds": round(time.monotonic() - started, 1), "exit": code}),
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
