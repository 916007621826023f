"""What a stream shows in the Prefect UI: a listeners table and a summary, per stream.

Both are keyed by the stream's uid (``scistream-listeners-<uid>``,
``scistream-stream-<uid>``), so the summary's later versions (OPEN, then RELEASED)
replace the earlier one in the UI. They are built from public fields only: the hello
key is never part of an artifact.
"""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError

__all__ = ["publish_listeners", "publish_summary"]


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (its lines show in the UI), or this package's outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("scistream_prefect")


def _publish(create, *args, **kwargs) -> None:
    # An artifact is for people; a stream must not fail because the UI could not be told.
    try:
        create(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        _log().warning("could not publish artifact %s: %s", kwargs.get("key"), exc)


def publish_listeners(handle) -> None:
    """A table of every listener of the stream: who listens where, for whom."""
    rows = (
        [{"end": "consumer gateway", "gateway": handle.consumer, "listener": a,
          "who connects": "the consumer app"} for a in handle.listeners]
        + [{"end": "producer gateway", "gateway": handle.producer, "listener": a,
            "who connects": "the consumer gateway (TLS)" if handle.tls else
            "the consumer gateway (NO encryption)"} for a in handle.producer_listeners]
        + [{"end": "producer app", "gateway": handle.producer, "listener": a,
            "who connects": "the producer gateway"} for a in handle.app_listeners]
    )
    _publish(create_table_artifact, rows, key=f"scistream-listeners-{handle.uid}",
             description=f"Listeners of SciStream stream {handle.uid}")


def publish_summary(uid: str, producer: str, consumer: str, state: str, *,
                    setup_s: float | None = None, num_conn: int | None = None,
                    tls: bool | None = None, note: str = "") -> None:
    """The stream's summary: uid, gateways, setup time, state."""
    lines = [
        f"### SciStream stream `{uid}`",
        "",
        "| | |",
        "|---|---|",
        f"| state | **{state}** |",
        f"| producer gateway | {producer} |",
        f"| consumer gateway | {consumer} |",
    ]
    if num_conn is not None:
        lines.append(f"| connections | {num_conn} |")
    if tls is not None:
        hop = "TLS 1.3, pinned" if tls else "NOT encrypted"
        lines.append(f"| gateway-to-gateway hop | {hop} |")
    if setup_s is not None:
        lines.append(f"| setup time | {setup_s:.3f} s |")
    lines.append(f"| as of | {time.strftime('%Y-%m-%d %H:%M:%S %Z')} |")
    if note:
        lines += ["", note]
    _publish(create_markdown_artifact, "\n".join(lines), key=f"scistream-stream-{uid}",
             description=f"SciStream stream {uid}: {state}")
