"""``make federation``: build the two-facility world, stream through it end to end, tear it
down, and print one JSON line last (bytes, checksum_ok, tls, setup_s, setup_round_trips,
left, ...). Run as root: ``PYTHONPATH=tests python -m world [--bytes N]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from world.federation import Federation, stream_end_to_end
from world.netns import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m world", description=__doc__)
    parser.add_argument("--bytes", type=int, default=1 << 30, help="bytes to stream (1 GiB)")
    parser.add_argument("--connections", type=int, default=4, help="num_conn of the stream")
    parser.add_argument("--delay-ms", type=int, default=0,
                        help="added to every request to the web service (distance to cloud)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the world needs root (network namespaces, Unix users)", file=sys.stderr)
        return 2
    if stale := sweep():
        print(f"removed a dead run's namespaces: {stale}", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="scistream-federation-"))
    started = time.perf_counter()
    fed = Federation(root, delay_ms=args.delay_ms)
    summary: dict = {}
    try:
        print(f"building the world in {root} (namespaces ssw{fed.world.token}-*) ...",
              file=sys.stderr, flush=True)
        fed.start()
        summary["world_s"] = round(time.perf_counter() - started, 1)
        print("streaming ...", file=sys.stderr, flush=True)
        summary.update(stream_end_to_end(fed, args.bytes, args.connections))
    except Exception as exc:  # noqa: BLE001 - the summary still comes, saying why
        summary["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
    finally:
        left = {**summary.get("left", {}), **fed.stop()}
    summary["left"] = left
    if not left:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0 if summary.get("checksum_ok") and not left and "error" not in summary else 1


if __name__ == "__main__":
    sys.exit(main())
