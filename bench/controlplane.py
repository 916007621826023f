"""Control plane: how long a stream takes to open and release, how many sequential
remote round trips that takes, and what many concurrent streams cost, with two local
gateways on loopback.

    .venv/bin/python bench/controlplane.py [--quick] [--open-runs 100]
        [--session-runs 50] [--flow-runs 5] [--concurrent 50,200] [--backend native]
        [--workers 4] [--port-base 16200] [--added-delay-ms 0] [--out bench/results]
        [--json]

Measured, each as a distribution (n, p50, p90, p95, p99, min, max):
- open (direct calls), both paths alternately (A B A B), through the gateway functions
  (Globus Compute serializer, worker processes, SQLite, real proxies), from the first
  reserve until both proxies listen; then release. Folded: the client is the
  producer's controller, its hello rides on the producer's connect (reserve ‖ reserve
  -> connect ‖ connect). Separate: the producer's controller says hello itself once
  the stream is reserved, the client waits for it (reserve ‖ reserve -> hello ‖
  wait_hello -> connect ‖ connect).
- inside a running flow: ``stream_session`` (the session's tasks) from entering the
  ``with`` until the block runs, and its release when the block ends. Direct opens
  and sessions alternate (A B A B) inside one flow run.
- the ``open_stream`` and ``release_stream`` flow runs' own wall time (a flow run
  carries Prefect's fixed per-run cost).
- sequential remote round trips of each: every ``LocalGateway.call`` (the seam where
  gateway functions run) is recorded with its start and end; calls that overlap in
  time are one round trip. Counted, not assumed.
- ``--added-delay-ms N`` adds N ms to every gateway call at that seam (before the
  call), standing for the distance to a remote gateway: setup grows by N ms per
  sequential round trip.
- 50 and 200 streams opened at once on one gateway pair: time until all are open,
  each one's setup time, release time, and the RSS / PSS of the proxy processes of
  both gateways with them idle (per stream: above the figure with one stream open).

``--quick`` takes one or two minutes. Results: ``<out>/controlplane[-quick].{json,md}``.

``--world`` (root only; ``make bench-world``) measures through the real path instead, in
the federation of ``tests/world`` (docs/federation.md): real endpoint daemons behind the
Globus Compute web-service stand-in, RabbitMQ, a Prefect server and worker. With the
stand-in holding every request 0 and 50 ms (``--world-delays``, changed at run time,
alternately A B A B): remote setup as ``open-stream/scistream`` deployment runs started
from the user namespace (the gateway calls' span, first call's start to last call's
end, and the flow run's own duration), its sequential round trips counted from the
run's task runs (``world.federation.round_trips``), the release run, and per-call
overhead (bare ``gateway_info`` calls, one warm client in the user namespace). Then
the data plane over the WAN link: iperf3 through a TLS stream (producer app's host to
consumer app's host, P to C) against iperf3 direct between the gateway nodes' WAN
addresses (through P's NAT), alternately. Results: ``<out>/controlplane-world.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchlib

from prefect import flow  # noqa: E402 - benchlib sets Prefect's environment first

from scistream_prefect import (  # noqa: E402
    LocalGateway,
    LocalPair,
    open_stream,
    release_stream,
    stream_session,
)
from scistream_prefect import streams_core as core  # noqa: E402
from scistream_proxy.leaks import proxy_pids  # noqa: E402

IDLE_APP = ["127.0.0.1:9"]  # a hello needs the app's address; nothing connects to it here


class CallRecorder:
    """Records every ``LocalGateway.call`` (start, end, function) while active, each
    call first delayed by ``added_delay_s``."""

    def __init__(self, added_delay_s: float = 0.0):
        self.added_delay_s = added_delay_s
        self.calls: list[tuple[float, float, str]] = []
        self._lock = threading.Lock()
        self._original = None

    def __enter__(self) -> CallRecorder:
        original = self._original = LocalGateway.call
        recorder = self

        def call(gateway, function, request, timeout_s=None):
            started = time.perf_counter()
            try:
                if recorder.added_delay_s:
                    time.sleep(recorder.added_delay_s)
                return original(gateway, function, request, timeout_s)
            finally:
                with recorder._lock:
                    recorder.calls.append((started, time.perf_counter(), function))

        LocalGateway.call = call
        return self

    def __exit__(self, *exc) -> None:
        LocalGateway.call = self._original

    def take(self) -> list[tuple[float, float, str]]:
        with self._lock:
            calls, self.calls = self.calls, []
        return calls


def round_trips(calls: list[tuple[float, float, str]]) -> list[list[str]]:
    """Group calls into sequential round trips: a call that starts before every call
    of the current group has ended runs concurrently with it, and joins it."""
    groups: list[list[str]] = []
    group_end = None
    for start, end, function in sorted(calls):
        if group_end is not None and start < group_end:
            groups[-1].append(function)
            group_end = max(group_end, end)
        else:
            groups.append([function])
            group_end = end
    return groups


def sequence(groups: list[list[str]]) -> str:
    return " → ".join(" ‖ ".join(sorted(g)) for g in groups)


class TripCounter:
    """Round-trip counts of repeated operations: {count: times seen} and each sequence."""

    def __init__(self):
        self.counts: dict[str, dict[int, int]] = {}
        self.sequences: dict[str, dict[str, int]] = {}

    def add(self, operation: str, calls) -> None:
        groups = round_trips(calls)
        by_count = self.counts.setdefault(operation, {})
        by_count[len(groups)] = by_count.get(len(groups), 0) + 1
        seqs = self.sequences.setdefault(operation, {})
        seqs[sequence(groups)] = seqs.get(sequence(groups), 0) + 1

    def result(self) -> dict:
        return {op: {"round_trips": {str(k): v for k, v in sorted(counts.items())},
                     "usual": max(counts, key=counts.get),
                     "sequences": self.sequences[op]}
                for op, counts in self.counts.items()}


def with_p95(values: list[float]) -> dict:
    """:func:`benchlib.distribution` of ``values`` with its 95th percentile added."""
    dist = benchlib.distribution(values)
    if values:
        ordered = sorted(values)
        pos = (len(ordered) - 1) * 0.95
        low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
        dist["p95"] = ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
    return dist


class ControllerSteps(core.Steps):
    """The open logic's steps, with the producer's controller saying hello on its own
    once both reserves are back (as an app controller told the uid would)."""

    def __init__(self, producer, uid: str, key, app_listeners: list[str]):
        self.hello = (producer, uid, key, "PROD", app_listeners)
        self.thread: threading.Thread | None = None

    def both(self, step, first, second):
        replies = super().both(step, first, second)
        if step is core.reserve:
            self.thread = threading.Thread(target=core.hello, args=self.hello)
            self.thread.start()
        return replies


def open_direct(producer, consumer, folded: bool) -> core.StreamHandle:
    """One stream opened with the plain calls: the hello folded into the producer's
    connect, or sent by the producer's controller while the client waits for it."""
    if folded:
        uid, key = core.key_and_uid(None, None, IDLE_APP)
        return core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=1,
                              app_listeners=IDLE_APP)
    uid, key = core.key_and_uid(str(uuid.uuid4()), secrets.token_urlsafe(32), None)
    steps = ControllerSteps(producer, uid, key, IDLE_APP)
    try:
        return core.open_ends(producer, consumer, uid=uid, hello_key=key, num_conn=1,
                              hello_timeout_s=60, steps=steps)
    finally:
        if steps.thread is not None:
            steps.thread.join()


OPENS = {True: "open, hello folded into connect (direct calls)",
         False: "open, controller's own hello (direct calls)"}


@flow(name="bench-controlplane-opens")
def alternating_opens(producer: LocalGateway, consumer: LocalGateway, open_runs: int,
                      session_runs: int, added_delay_s: float = 0.0) -> dict:
    """Inside this one running flow, alternately (A B C A B C ...): a stream opened with
    direct calls and its hello folded into connect, one whose producer's controller says
    hello itself, each released; and a ``stream_session`` (the session's tasks), until
    each has run its count."""
    recorder, trips = CallRecorder(added_delay_s), TripCounter()
    opens = {folded: ([], []) for folded in OPENS}  # setup_s, release_s
    enter, setup, leave, leave_calls, counted = [], [], [], [], {folded: [] for folded in OPENS}
    with recorder:
        for index in range(max(open_runs, session_runs)):
            for folded, name in OPENS.items():
                if index >= open_runs:
                    continue
                recorder.take()
                handle = open_direct(producer, consumer, folded)
                opens[folded][0].append(handle.setup_s)
                counted[folded].append(handle.setup_round_trips)
                trips.add(name, recorder.take())
                started = time.perf_counter()
                core.release_both(producer, consumer, handle.uid)
                opens[folded][1].append(time.perf_counter() - started)
                trips.add("release (direct calls)", recorder.take())
            if index < session_runs:
                recorder.take()
                started = time.perf_counter()
                with stream_session(producer, consumer, num_conn=1,
                                    app_listeners=IDLE_APP) as handle:
                    enter.append(time.perf_counter() - started)
                    setup.append(handle.setup_s)
                    trips.add("stream_session open (tasks in a flow)", recorder.take())
                    ending = time.perf_counter()
                leave.append(time.perf_counter() - ending)
                calls = recorder.take()
                if calls:
                    leave_calls.append(max(c[1] for c in calls) - min(c[0] for c in calls))
                trips.add("stream_session release (calls in a flow)", calls)
    return {"opens": {name: {"setup_s": with_p95(opens[folded][0]),
                             "release_s": with_p95(opens[folded][1]),
                             "setup_round_trips": sorted(set(counted[folded]))}
                      for folded, name in OPENS.items()},
            "enter_s": with_p95(enter),
            "setup_s": with_p95(setup),
            "session_release_s": with_p95(leave),
            "session_release_calls_s": with_p95(leave_calls),
            "trips": trips.result()}


def flow_runs(producer, consumer, runs: int, recorder: CallRecorder, trips: TripCounter) -> dict:
    opens, releases = [], []
    handle = open_stream(producer, consumer, num_conn=1, app_listeners=IDLE_APP)  # warm-up
    release_stream(producer, consumer, handle.uid)
    for _ in range(runs):
        recorder.take()
        started = time.perf_counter()
        handle = open_stream(producer, consumer, num_conn=1, app_listeners=IDLE_APP)
        opens.append(time.perf_counter() - started)
        trips.add("open_stream flow run", recorder.take())
        started = time.perf_counter()
        release_stream(producer, consumer, handle.uid)
        releases.append(time.perf_counter() - started)
        trips.add("release_stream flow run", recorder.take())
    return {"open_stream_s": with_p95(opens),
            "release_stream_s": with_p95(releases)}


def concurrent_streams(pair: LocalPair, counts: list[int], num_conn: int,
                       root: Path) -> dict:
    """Open each count of streams at once; memory of every proxy process of both
    gateways with them idle, against the same with one stream."""

    def memory() -> dict:
        pids = benchlib.descendants(proxy_pids(under=root))
        return {**benchlib.memory_kib(pids), "processes": len(pids)}

    def open_one(_):
        return pair.open(IDLE_APP * num_conn)

    one = open_one(0)
    time.sleep(0.5)
    baseline = memory()
    one.release()
    out: dict = {"baseline_one_stream": baseline}
    for count in counts:
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            futures = [pool.submit(open_one, i) for i in range(count)]
            chains, errors = [], []
            for future in futures:
                try:
                    chains.append(future.result())
                except Exception as exc:  # noqa: BLE001 - reported, the rest released
                    errors.append(f"{type(exc).__name__}: {exc}")
        all_open = time.perf_counter() - started
        time.sleep(0.5)  # let every proxy settle into its idle state
        mem = memory()
        started = time.perf_counter()
        with ThreadPoolExecutor(min(count, 32)) as pool:
            list(pool.map(lambda c: c.release(), chains))
        released = time.perf_counter() - started
        extra = count - 1
        per_stream = {key: (mem[key] - baseline[key]) / extra
                      if extra and mem[key] is not None and baseline[key] is not None else None
                      for key in ("rss_kib", "pss_kib")}
        out[str(count)] = {
            "opened": len(chains), "errors": errors[:5], "error_count": len(errors),
            "all_open_s": all_open, "setup_s": with_p95([c.seconds for c in chains]),
            "release_all_s": released, "memory": mem,
            "per_stream_kib": per_stream,
        }
    return out


# One warm client in the user namespace: a first call (Executor, token, result channel),
# then bare gateway_info calls, each timed; prints their seconds. A random pause before
# each: back to back, calls lock to the 0.5 s ticks on a result's way (the endpoint's
# result publisher, the SDK's result watcher) and all measure one phase.
_CALLS = """
import json, random, sys, time
from scistream_prefect.compute import GlobusComputeGateway
gateway = GlobusComputeGateway(**json.loads(sys.argv[1]))
gateway.call("gateway_info", {})
seconds = []
for _ in range(int(sys.argv[2])):
    time.sleep(random.uniform(0, 0.5))
    started = time.perf_counter()
    gateway.call("gateway_info", {})
    seconds.append(time.perf_counter() - started)
print(json.dumps(seconds))
"""
IPERF_PORT = 5201


def run_world(args) -> dict:
    """The world mode: build the federation, measure, tear it down (what remained is
    reported as an error)."""
    import tempfile as _tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from world.federation import Federation
    from world.netns import sweep

    if stale := sweep():
        print(f"removed a dead run's namespaces: {stale}", file=sys.stderr)
    result: dict = {"bench": "controlplane-world", "quick": False, "errors": [],
                    "config": {"world_runs": args.world_runs, "world_calls": args.world_calls,
                               "world_delays_ms": args.world_delays,
                               "iperf_seconds": args.iperf_seconds},
                    "machine": benchlib.machine()}
    started = time.monotonic()
    root = Path(_tempfile.mkdtemp(prefix="scistream-bench-world-"))
    fed = Federation(root, delay_ms=args.world_delays[0])
    try:
        print(f"building the world in {root} ...", file=sys.stderr, flush=True)
        fed.start()
        result["world_s"] = round(time.monotonic() - started, 1)
        measure_world(args, fed, result)
    except Exception as exc:  # noqa: BLE001 - the result says why, the world still goes
        result["errors"].append(f"{type(exc).__name__}: {exc}"[-3000:])
    finally:
        if left := fed.stop():
            result["errors"].append(f"left after the world's teardown: {left}")
    if not result["errors"]:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    result["checks"] = world_checks(result).items
    result["seconds_total"] = round(time.monotonic() - started, 1)
    return result


def measure_world(args, fed, result: dict) -> None:
    from world.federation import call, run_completed
    from world.federation import round_trips as task_run_round_trips
    from world.netns import APP_P

    p, c = fed.nodes["P"], fed.nodes["C"]
    per_delay = {d: {"calls_s": [], "run_s": [], "release_s": [], "round_trips": {},
                     "call_s": []} for d in args.world_delays}
    for index in range(args.world_runs):
        for delay in args.world_delays:  # alternately, A B A B
            fed.compute.configure(delay_ms=delay)
            into = per_delay[delay]
            print(f"setup {index + 1}/{args.world_runs} at {delay} ms ...", file=sys.stderr,
                  flush=True)
            uid = str(uuid.uuid4())
            opened = run_completed(fed, "open-stream/scistream", {
                "producer": p.block(), "consumer": c.block(), "num_conn": 1,
                "app_listeners": [f"{APP_P}:{IPERF_PORT}"], "uid": uid, "tls": True})
            released = run_completed(fed, "release-stream/scistream", {
                "producer": p.block(), "consumer": c.block(), "uid": uid})
            calls = [t for t in opened["tasks"] if "-compute:" in t[0]]
            into["calls_s"].append(max(t[2] for t in calls) - min(t[1] for t in calls))
            into["run_s"].append(opened["seconds"])
            into["release_s"].append(released["seconds"])
            trips = task_run_round_trips(opened["tasks"])
            into["round_trips"][trips] = into["round_trips"].get(trips, 0) + 1
    for delay in args.world_delays:
        fed.compute.configure(delay_ms=delay)
        per_delay[delay]["call_s"] = fed.prefect.python(
            _CALLS, json.dumps(p.block()), str(args.world_calls))
    fed.compute.configure(delay_ms=0)
    result["delays"] = {
        str(d): {"setup_calls_s": with_p95(v["calls_s"]), "setup_run_s": with_p95(v["run_s"]),
                 "release_run_s": with_p95(v["release_s"]),
                 "round_trips": {str(k): n for k, n in sorted(v["round_trips"].items())},
                 "usual_round_trips": max(v["round_trips"], key=v["round_trips"].get),
                 "call_s": with_p95(v["call_s"])}
        for d, v in per_delay.items()}
    print("data plane: iperf3 through a stream and direct ...", file=sys.stderr, flush=True)
    result["dataplane"] = world_dataplane(args, fed, call, run_completed)


def world_dataplane(args, fed, call, run) -> dict:
    """iperf3 (-R: the server in the producer's place sends) through a TLS stream from
    app-p to app-c, and direct from fac-p's WAN address to fac-c (through P's NAT, the
    stream's own WAN path), alternately; Gbit/s received, per round."""
    from world.netns import APP_P, P_PUBLIC, P_WAN

    p, c = fed.nodes["P"], fed.nodes["C"]
    servers = [fed.world.popen(ns, ["iperf3", "-s", "-B", host, "-p", str(IPERF_PORT)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for ns, host in (("app-p", APP_P), ("fac-p", P_WAN))]
    uid = str(uuid.uuid4())
    rounds: dict[str, list[float]] = {"stream": [], "direct": []}
    try:
        for ns in ("app-p", "fac-p"):
            _await_listening(fed, ns, IPERF_PORT)
        run(fed, "open-stream/scistream", {
            "producer": p.block(), "consumer": c.block(), "num_conn": 1,
            "app_listeners": [f"{APP_P}:{IPERF_PORT}"], "uid": uid, "tls": True})
        try:
            listener = call(fed, c, "status", {"uid": uid})["listeners"][0]
            targets = {"stream": ("app-c", listener),
                       "direct": ("fac-c", f"{P_PUBLIC}:{IPERF_PORT}")}
            for _ in range(args.iperf_rounds):
                for name, (ns, address) in targets.items():
                    rounds[name].append(_iperf3(fed, ns, address, args.iperf_seconds))
        finally:
            run(fed, "release-stream/scistream", {
                "producer": p.block(), "consumer": c.block(), "uid": uid})
    finally:
        for server in servers:
            server.kill()
            server.wait()
    out = {name: {"gbit_s": statistics.median(v), "rounds": v} for name, v in rounds.items()}
    out["stream_over_direct"] = out["stream"]["gbit_s"] / out["direct"]["gbit_s"]
    return out


def _await_listening(fed, ns: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        done = fed.world.run(ns, ["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                             text=True)
        if done.stdout.strip():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 -s did not listen in {ns}")
        time.sleep(0.1)


def _iperf3(fed, ns: str, address: str, seconds: int) -> float:
    """One iperf3 -R run from ``ns`` to ``address``; Gbit/s received."""
    host, _, port = address.rpartition(":")
    for _ in range(40):  # the server may still be tearing the previous test down
        done = fed.world.run(ns, ["iperf3", "-c", host.strip("[]"), "-p", port, "-R", "-t",
                                  str(seconds), "-J"], capture_output=True, text=True,
                             timeout=seconds + 60)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 to {address} from {ns} printed no JSON: "
                               f"{(done.stderr or done.stdout)[-300:]}") from None
        error = report.get("error", "")
        if "busy" not in error and "unable to send cookie" not in error:
            break
        time.sleep(0.25)
    if "error" in report:
        raise RuntimeError(f"iperf3 to {address} from {ns}: {report['error']}")
    return report["end"]["sum_received"]["bits_per_second"] / 1e9


def world_checks(result: dict) -> benchlib.Checks:
    out = benchlib.Checks()
    for delay, info in result.get("delays", {}).items():
        trips, p50 = info["usual_round_trips"], info["setup_calls_s"].get("p50")
        out.add_at_most(f"setup at {delay} ms per request: 2 round trips", trips, 2,
                        f"counted from the run's task runs: {info['round_trips']}")
        added = trips * int(delay) / 1000
        out.add_at_most(f"setup p50 at {delay} ms <= added delays + 0.3 s",
                        p50, added + 0.3,
                        f"gateway calls' span p50 {_fmt(p50, 3)} s, added "
                        f"{trips} x {delay} ms; the flow run's p50 "
                        f"{_fmt(info['setup_run_s'].get('p50'), 3)} s")
    return out


def world_markdown(result: dict, label_line: str) -> str:
    lines = ["# Control plane through the federation", "", label_line, "",
             "Two facilities in network namespaces (docs/federation.md): real Globus "
             "Compute endpoint daemons, the web-service stand-in holding every request "
             "the added delay, RabbitMQ, a Prefect server and worker. Setup: the "
             "`open-stream/scistream` deployment run from the user namespace, 1 "
             "connection, TLS, the hello folded into P's connect. Seconds.", ""]
    rows = []
    for delay, info in result.get("delays", {}).items():
        calls, run_s, call = info["setup_calls_s"], info["setup_run_s"], info["call_s"]
        added = info["usual_round_trips"] * int(delay) / 1000
        rows.append([delay, info["usual_round_trips"], calls["n"], _fmt(calls.get("p50"), 3),
                     _fmt(calls.get("p95"), 3), _fmt(calls["p50"] - added, 3),
                     _fmt(run_s.get("p50"), 3), _fmt(run_s.get("p95"), 3),
                     _fmt(info["release_run_s"].get("p50"), 3),
                     _fmt(call.get("p50"), 3), _fmt(call.get("p95"), 3),
                     _fmt(4.3 / calls["p50"], 1)])
    if rows:
        lines += [benchlib.markdown_table(
            ["added ms per request", "round trips", "n", "setup p50 (calls)",
             "setup p95 (calls)", "p50 above added delays", "open run p50", "open run p95",
             "release run p50", "gateway_info p50", "gateway_info p95",
             "StreamHub 4.3 s / setup p50"], rows), "",
            "Setup (calls): first gateway call's start to last one's end, from the run's "
            "task runs. Open run: the flow run's own duration (Prefect's per-run cost "
            "included). gateway_info: one bare call, a warm client in the user "
            "namespace.", ""]
    data = result.get("dataplane")
    if data:
        lines += [benchlib.markdown_table(
            ["WAN path (iperf3 -R, P to C)", "Gbit/s (median)", "rounds", "× direct"],
            [["through a TLS stream (app-p -> P -> C -> app-c)",
              _fmt(data["stream"]["gbit_s"]), ", ".join(_fmt(v) for v in data["stream"]["rounds"]),
              _fmt(data["stream_over_direct"])],
             ["direct, fac-p WAN -> NAT -> fac-c", _fmt(data["direct"]["gbit_s"]),
              ", ".join(_fmt(v) for v in data["direct"]["rounds"]), "1.00"]]), ""]
    lines += ["Targets:", "", benchlib.Checks(result["checks"]).markdown(), ""]
    if result.get("errors"):
        lines += ["Errors: " + "; ".join(result["errors"]), ""]
    return "\n".join(lines)


def checks(result: dict) -> benchlib.Checks:
    out = benchlib.Checks()
    enter = result.get("session", {}).get("enter_s", {})
    out.add_at_most("stream setup inside a running flow p50 <= 0.25 s", enter.get("p50"), 0.25,
                    f"p50 {_fmt(enter.get('p50'), 3)} s over {enter.get('n', 0)} sessions")
    folded = result.get("round_trips", {}).get(OPENS[True], {})
    out.add_at_most("setup with the hello folded into connect: 2 round trips",
                    folded.get("usual"), 2,
                    f"counted at the seam: {folded.get('round_trips', '-')}")
    counts = [int(k) for k in result.get("concurrent", {}) if k.isdigit()]
    if counts:
        top = result["concurrent"][str(max(counts))]
        kib = top["per_stream_kib"]["rss_kib"]
        mb = kib * 1024 / 1e6 if kib is not None else None
        out.add_at_most(f"idle RSS per stream <= 12 MB ({result['config']['backend']})",
                        mb, 12.0,
                        f"{_fmt(mb)} MB per stream (both ends) with {max(counts)} idle streams")
    else:
        out.add_at_most("idle RSS per stream <= 12 MB", None, 12.0, "not run")
    return out


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict, label_line: str, readme: bool = False) -> str:
    lines = [] if readme else ["# Control plane benchmark", ""]
    lines += [label_line, "",
              f"Two local gateways on loopback, backend `{result['config']['backend']}`, "
              f"{result['config']['workers']} worker processes each, "
              f"{result['config'].get('added_delay_ms', 0):g} ms added to every gateway "
              "call. Seconds. Method: [docs/benchmarks.md](../../docs/benchmarks.md).", ""]
    paths = result.get("setup_paths", {})
    if paths:
        rows = [[name, ", ".join(map(str, info["setup_round_trips"])), info["setup_s"]["n"],
                 *[_fmt(info["setup_s"].get(k), 3) for k in ("p50", "p95")]]
                for name, info in paths.items()]
        lines += ["Setup by path (round trips as the client counts them, `setup_round_trips`):",
                  "", benchlib.markdown_table(["path", "round trips", "n", "setup p50",
                                               "setup p95"], rows), ""]
    rows = []
    for name, dist in result["timings"].items():
        if dist.get("n"):
            rows.append([name, dist["n"], *[_fmt(dist.get(k), 3) for k in
                                            ("p50", "p90", "p95", "p99", "min", "max")]])
    lines += [benchlib.markdown_table(["measure", "n", "p50", "p90", "p95", "p99", "min",
                                       "max"], rows), ""]
    rows = [[op, info["usual"], ", ".join(f"{k} × {v}" for k, v in info["round_trips"].items()),
             "; ".join(info["sequences"])] for op, info in result["round_trips"].items()]
    lines += ["Sequential remote round trips (calls at the gateway seam, overlapping ones "
              "counted once):", "",
              benchlib.markdown_table(["operation", "usual", "seen (count × runs)",
                                       "sequence"], rows), ""]
    concurrent = result.get("concurrent", {})
    if concurrent:
        base = concurrent["baseline_one_stream"]
        lines += [f"Streams opened at once on one gateway pair ({result['config']['num_conn']} "
                  "connection each); proxy memory of both gateways with them idle (one stream "
                  f"open: RSS {base['rss_kib'] / 1024:.1f} MiB, {base['processes']} "
                  "processes):", ""]
        rows = []
        for count, info in concurrent.items():
            if not count.isdigit():
                continue
            mem, per = info["memory"], info["per_stream_kib"]
            rows.append([count, f"{info['opened']}" + (f" ({info['error_count']} failed)"
                                                       if info["error_count"] else ""),
                         _fmt(info["all_open_s"]), _fmt(info["setup_s"].get("p50"), 3),
                         _fmt(info["setup_s"].get("max"), 3), _fmt(info["release_all_s"]),
                         f"{mem['rss_kib'] / 1024:.1f}",
                         _fmt(mem["pss_kib"] / 1024 if mem["pss_kib"] is not None else None, 1),
                         mem["processes"],
                         _fmt(per["rss_kib"] * 1024 / 1e6 if per["rss_kib"] is not None
                              else None)])
        lines += [benchlib.markdown_table(
            ["streams", "opened", "all open (s)", "setup p50", "setup max", "release all (s)",
             "RSS MiB", "PSS MiB", "processes", "RSS per stream (MB)"], rows), ""]
    lines += ["Targets:", "", benchlib.Checks(result["checks"]).markdown(), ""]
    if result.get("errors"):
        lines += ["Errors: " + "; ".join(result["errors"]), ""]
    return "\n".join(lines)


def run(args) -> dict:
    result: dict = {
        "bench": "controlplane", "quick": args.quick,
        "config": {k: getattr(args, k) for k in ("open_runs", "session_runs", "flow_runs",
                                                   "concurrent", "backend", "workers",
                                                   "num_conn", "port_base",
                                                   "added_delay_ms")},
        "machine": benchlib.machine(), "timings": {}, "round_trips": {}, "errors": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scistream-bench-controlplane-") as tmp:
        try:
            measure(args, Path(tmp), result)
        finally:
            left = benchlib.stop_leftovers(Path(tmp))
            if left:
                result["errors"].append(f"proxy processes left after release, killed: {left}")
    result["checks"] = checks(result).items
    result["seconds_total"] = round(time.monotonic() - started, 1)
    return result


def measure(args, root: Path, result: dict) -> None:
    biggest = max(args.concurrent, default=0) * args.num_conn
    with LocalPair.create(root / "open", name="open", port_base=args.port_base, ports=20,
                          backend=args.backend, workers=args.workers) as pair:
        pair.warm_up()
        measure_opens(args, pair, result)
    if args.concurrent:
        print(f"concurrent streams {args.concurrent} ...", file=sys.stderr)
        with LocalPair.create(root / "many", name="many", port_base=args.port_base + 40,
                              ports=biggest + 10, backend=args.backend,
                              workers=args.workers) as many:
            many.warm_up()
            result["concurrent"] = concurrent_streams(many, args.concurrent, args.num_conn,
                                                      root / "many")


def measure_opens(args, pair: LocalPair, result: dict) -> None:
    """Opens with direct calls and sessions alternately, then flow runs, on ``pair``."""
    producer, consumer = pair.producer, pair.consumer
    print(f"alternately: open/release with direct calls x{args.open_runs} per path, "
          f"stream_session x{args.session_runs}, inside one flow ...", file=sys.stderr)
    opens = alternating_opens(producer, consumer, args.open_runs, args.session_runs,
                              args.added_delay_ms / 1000)
    timings = result["timings"]
    result["setup_paths"] = opens["opens"]
    for name, info in opens["opens"].items():
        timings[f"{name}: setup_s (first reserve to both listening)"] = info["setup_s"]
        timings[f"{name}: release"] = info["release_s"]
    timings["stream_session open inside a flow (until the block runs)"] = opens["enter_s"]
    timings["  of which setup_s (first reserve to both listening)"] = opens["setup_s"]
    timings["stream_session release (block end to released)"] = opens["session_release_s"]
    timings["  of which the release calls (first start to last end)"] = \
        opens["session_release_calls_s"]
    result["session"] = {"enter_s": opens["enter_s"], "setup_s": opens["setup_s"],
                         "release_s": opens["session_release_s"]}
    result["round_trips"].update(opens["trips"])
    if args.flow_runs:
        print(f"open_stream/release_stream flow runs x{args.flow_runs} ...", file=sys.stderr)
        recorder, trips = CallRecorder(args.added_delay_ms / 1000), TripCounter()
        with recorder:
            flows = flow_runs(producer, consumer, args.flow_runs, recorder, trips)
        timings["open_stream flow run (wall)"] = flows["open_stream_s"]
        timings["release_stream flow run (wall)"] = flows["release_stream_s"]
        result["round_trips"].update(trips.result())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="20 opens, 15 sessions, 2 flow runs (unless given)")
    parser.add_argument("--open-runs", type=int, help="opens with direct calls (default 100)")
    parser.add_argument("--session-runs", type=int,
                        help="stream_session runs inside one flow (default 50)")
    parser.add_argument("--flow-runs", type=int, help="open_stream flow runs (default 5)")
    parser.add_argument("--concurrent", default="50,200",
                        help="stream counts opened at once ('' to skip; default 50,200)")
    parser.add_argument("--num-conn", type=int, default=1,
                        help="connections per stream in the concurrent part")
    parser.add_argument("--backend", default="native", help="S2DS backend (default native)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes per gateway")
    parser.add_argument("--port-base", type=int, default=16200,
                        help="the gateways' ports start here (40 + 2 x (largest count x "
                        "num_conn + 10) ports)")
    parser.add_argument("--added-delay-ms", type=float, default=0.0, metavar="N",
                        help="add N ms to every gateway call at the client's seam, standing "
                        "for the distance to remote gateways (default 0)")
    parser.add_argument("--world", action="store_true",
                        help="measure through the federation of tests/world instead (root "
                        "only; builds it, a few minutes)")
    parser.add_argument("--world-runs", type=int, default=8,
                        help="--world: setups per added delay (default 8)")
    parser.add_argument("--world-calls", type=int, default=20,
                        help="--world: bare gateway_info calls per added delay (default 20)")
    parser.add_argument("--world-delays", default="0,50",
                        help="--world: ms the web service holds every request (default 0,50)")
    parser.add_argument("--iperf-seconds", type=int, default=5,
                        help="--world: iperf3 -t per run (default 5)")
    parser.add_argument("--iperf-rounds", type=int, default=2,
                        help="--world: iperf3 runs per path, alternately (default 2)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS_DIR)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--update-readme", action="store_true",
                        help="also put the tables in README.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="run nothing: write the Markdown of a saved result")
    args = parser.parse_args(argv)
    defaults = {"open_runs": (100, 20), "session_runs": (50, 15), "flow_runs": (5, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.concurrent = [int(c) for c in args.concurrent.split(",") if c]
    args.world_delays = [int(d) for d in args.world_delays.split(",") if d]
    if args.world and not args.render:
        if os.geteuid() != 0:
            parser.error("--world builds network namespaces and Unix users: run it as root "
                         "(as CI does)")
        if args.world_runs < 1 or args.world_calls < 1 or not args.world_delays \
                or args.iperf_seconds < 1 or args.iperf_rounds < 1:
            parser.error("--world-runs, --world-calls, --iperf-seconds and --iperf-rounds "
                         "must be positive, --world-delays not empty")
        return args
    if args.open_runs < 1 or args.session_runs < 0 or args.flow_runs < 0 \
            or min(args.concurrent, default=2) < 2 or not 0 <= args.added_delay_ms <= 10_000:
        parser.error("--open-runs must be positive, --session-runs and --flow-runs not "
                     "negative, --concurrent counts at least 2, --added-delay-ms 0-10000")
    reason = None if args.render else benchlib.backend_skip_reason(args.backend)
    if reason:
        parser.error(f"backend {args.backend} cannot run here: {reason}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.world or args.render and "world" in args.render.name:
        result = json.loads(args.render.read_text()) if args.render else run_world(args)
        label_line = result.setdefault("label", benchlib.run_label(
            False, ["bench/controlplane.py", *(sys.argv[1:] if argv is None else argv)]))
        return benchlib.publish(args, "controlplane-world", "controlplane-world", result,
                                world_markdown(result, label_line))
    if args.render:
        result = json.loads(args.render.read_text())
        label_line = result["label"]
    else:
        result = run(args)
        label_line = result["label"] = benchlib.run_label(
            args.quick, ["bench/controlplane.py", *(sys.argv[1:] if argv is None else argv)])
    stem = "controlplane-quick" if result["quick"] else "controlplane"
    text = markdown(result, label_line)
    return benchlib.publish(args, "controlplane", stem, result, text,
                            readme_text=markdown(result, label_line, True))


if __name__ == "__main__":
    sys.exit(main())
