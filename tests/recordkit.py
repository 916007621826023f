"""What Prefect keeps about given flow runs, read in full, and a search for a secret in
stored bytes (as they are, or as base64 text at any alignment).

Log lines are read through Prefect's client filtered by the runs (and by their task
runs), page by page until a page comes back empty, so a search neither stops at the
API's first page nor wanders into other tests' runs.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log, TaskRun
from prefect.client.schemas.sorting import LogSort
from prefect.logging.handlers import APILogHandler

#: The API's largest page (PREFECT_SERVER_API_DEFAULT_LIMIT).
PAGE = 200


@dataclass
class RunRecords:
    """Flow runs, their task runs, and the log lines of either, as the API holds them."""

    flow_runs: list[FlowRun]
    task_runs: list[TaskRun]
    logs: list[Log]

    def messages(self) -> list[str]:
        return [log.message for log in self.logs]

    def texts(self) -> Iterator[str]:
        """Every record as Prefect's API returned it (JSON), every log line in full."""
        for record in (*self.flow_runs, *self.task_runs, *self.logs):
            yield record.model_dump_json()


def _pages(read: Callable[[int], list]) -> Iterator:
    offset = 0
    while page := read(offset):
        yield from page
        offset += len(page)


def run_records(*flow_run_ids, expect: Iterable[str] = (),
                wait_s: float = 60.0) -> RunRecords:
    """The flow runs, all their task runs, and every log line of either.

    Log lines reach the server in batches, and are stored after their POST returns, so
    a read right after a run may miss its last lines. So this reads again until each
    flow run's last line ("Finished in state ...") and every line of ``expect`` are
    there, for up to ``wait_s``: a search of the lines then covers the runs to their
    ends. What is still missing then fails the read."""
    deadline = time.monotonic() + wait_s
    while True:
        APILogHandler().flush()  # send what this process still queues
        records = _read(flow_run_ids)
        messages = records.messages()
        finished = {log.flow_run_id for log in records.logs
                    if log.task_run_id is None and log.message.startswith("Finished in state")}
        missing = [line for line in expect if not any(line in m for m in messages)]
        missing += [f"Finished in state ... (flow run {run_id})" for run_id in flow_run_ids
                    if run_id not in finished]
        if not missing:
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"lines logged by the runs never reached the server "
                                 f"within {wait_s} s: {missing}")
        time.sleep(0.5)


def _read(flow_run_ids) -> RunRecords:
    with get_client(sync_client=True) as client:
        flow_runs = [client.read_flow_run(run_id) for run_id in flow_run_ids]
        task_filter = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=list(flow_run_ids)))
        task_runs = list(_pages(lambda offset: client.read_task_runs(
            task_run_filter=task_filter, limit=PAGE, offset=offset)))
        filters = [LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(flow_run_ids)))]
        if task_runs:
            filters.append(LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[t.id for t in task_runs])))
        logs: dict = {}
        for log_filter in filters:
            for log in _pages(lambda offset, f=log_filter: client.read_logs(
                    f, limit=PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)):
                logs[log.id] = log
    return RunRecords(flow_runs, task_runs, list(logs.values()))


def encodings(secret: str) -> list[bytes]:
    """The secret's bytes, and its base64 (standard and URL-safe) at each of the three
    alignments it can have inside a longer base64 text: the characters that depend on
    the secret's bytes alone."""
    raw = secret.encode()
    found = [raw]
    for shift in range(3):
        text = base64.b64encode(bytes(shift) + raw).rstrip(b"=")
        # A group of 4 characters covers 3 bytes: skip the group shared with the bytes
        # before the secret, and a last, partial one shared with the bytes after.
        middle = text[4 if shift else 0:len(text) // 4 * 4]
        found += [middle, middle.translate(bytes.maketrans(b"+/", b"-_"))]
    return found


def files_containing(root: Path, secret: str) -> list[Path]:
    """Files under ``root`` that hold ``secret``, as it is or in base64 (also broken
    into lines, as Prefect stores a result: MIME base64, 76 characters a line)."""
    needles = encodings(secret)
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            joined = data.replace(b"\r", b"").replace(b"\n", b"")
            if any(needle in text for needle in needles for text in (data, joined)):
                found.append(path)
    return found
