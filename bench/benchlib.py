"""What the benchmarks share: iperf3 runs, A B A B rounds, distributions, proxy CPU and
memory read from /proc, and the result files. Their gateways and streams are
``scistream_prefect.LocalPair``'s.

Every figure a benchmark prints comes from a function here or from its own script; no
figure is ever written by hand. Results go to ``bench/results/<name>.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from scistream_prefect.local_pair import PairStream  # noqa: E402
from scistream_proxy.leaks import port_is_free, proxy_pids  # noqa: E402
from scistream_proxy.addresses import parse_address  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- leftovers and backends -------------------------------------------------------------

def stop_leftovers(root: Path) -> list[int]:
    """Kill (by pid) every proxy process still working below ``root``, which only a run
    that failed halfway leaves; return their pids so the run can say so."""
    import signal

    left = proxy_pids(under=root)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def container_reach_reason() -> str | None:
    """Why host-networked containers cannot be reached from here: the Docker engine
    runs in another network namespace than this process (``unshare --net``)."""
    mine = os.readlink("/proc/self/ns/net")
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "dockerd" \
                    and os.readlink(proc / "ns" / "net") != mine:
                return "the Docker engine's host network is another network namespace " \
                       "than this benchmark's"
        except OSError:
            continue
    return None


def backend_skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run in this benchmark, or None."""
    from scistream_proxy.backends import BACKENDS

    if name not in BACKENDS:
        return f"unknown backend (known: {', '.join(BACKENDS)})"
    reason = BACKENDS[name].unavailable_reason()
    if reason is None and name.endswith("-docker"):
        reason = container_reach_reason()
    return reason


# -- processes: CPU and memory from /proc ----------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` and every process below them (nginx's and haproxy's workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            stat = _stat(int(proc.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(proc.name))
    found, todo = set(), [p for p in roots if p]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def chain_pids(chain: PairStream) -> set[int]:
    """The processes serving ``chain`` on both gateways: each end's proxy (from its
    status, so containers count too), every process working in the stream's
    directories (holders, workers), and their descendants. The native relay serves
    all of its gateway's streams in one process, so it counts whole."""
    pids = set()
    for gw in (chain.pair.producer, chain.pair.consumer):
        status = gw.call("status", {"uid": chain.uid})
        if status.get("pid"):
            pids.add(int(status["pid"]))
        pids.update(proxy_pids(under=gw.settings.state_dir / "streams" / chain.uid))
    return descendants(pids)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds ``pids`` used so far (gone processes count 0)."""
    ticks = 0
    for pid in pids:
        stat = _stat(pid)
        if stat is not None:
            ticks += int(stat[11]) + int(stat[12])  # utime, stime
    return ticks / CLK_TCK


def memory_kib(pids: Iterable[int]) -> dict:
    """Summed RSS and PSS (KiB) of ``pids``; PSS splits shared pages among their users,
    so nginx's or haproxy's workers are not counted twice. PSS is None where
    /proc/<pid>/smaps_rollup cannot be read."""
    rss, pss = 0, 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
        if pss is not None:
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                pss += next(int(line.split()[1]) for line in text.splitlines()
                            if line.startswith("Pss:"))
            except (OSError, StopIteration):
                pss = None
    return {"rss_kib": rss, "pss_kib": pss}


class MemorySampler:
    """Peak RSS/PSS of ``pids`` sampled every ``interval_s`` while the ``with`` block runs."""

    def __init__(self, pids: Iterable[int], interval_s: float = 0.25):
        self.pids, self.interval_s = list(pids), interval_s
        self.peak = {"rss_kib": 0, "pss_kib": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        now = memory_kib(self.pids)
        for key in self.peak:
            if now[key] is None or self.peak[key] is None:
                self.peak[key] = None
            else:
                self.peak[key] = max(self.peak[key], now[key])

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.pids:
            self._stop.set()
            self._thread.join()
            self._sample()


# -- iperf3 ----------------------------------------------------------------------------

def iperf3_missing() -> str | None:
    return None if shutil.which("iperf3") else "iperf3 is not installed (apt-get install iperf3)"


class IperfServer:
    """``iperf3 -s`` on 127.0.0.1:``port``, returned from ``with`` once it listens."""

    def __init__(self, port: int):
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> IperfServer:
        host, port = parse_address(self.address)
        self.proc = subprocess.Popen(["iperf3", "-s", "-B", host, "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while port_is_free(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr \
                    else ""
                self.__exit__()
                raise RuntimeError(f"iperf3 server on {self.address} did not start: {err}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()


def iperf3(address: str, conns: int, seconds: int, pids: Iterable[int] = ()) -> dict:
    """One iperf3 run of ``conns`` parallel connections to ``address`` (client sends).

    Returns Gbit/s received, bytes, the run's wall time, and the CPU share (100 = one
    core) and peak memory of ``pids`` (the proxies) during the run. Raises
    RuntimeError with iperf3's own message when the run fails.
    """
    pids = list(pids)
    host, port = parse_address(address)
    for _ in range(80):  # the server may still be tearing the previous test down
        with MemorySampler(pids) as memory:
            cpu_before, started = cpu_seconds(pids), time.perf_counter()
            proc = subprocess.run(["iperf3", "-c", host, "-p", str(port), "-P", str(conns),
                                   "-t", str(seconds), "-J"], capture_output=True, text=True,
                                  timeout=seconds + 60)
            wall = time.perf_counter() - started
            cpu = cpu_seconds(pids) - cpu_before
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(f"iperf3 via {address} printed no JSON: "
                               f"{(proc.stderr or proc.stdout)[-300:]}") from None
        # The server is busy with the previous test's teardown: it refuses ("busy") or,
        # through a proxy, its refusal arrives as a reset of the control connection.
        error = result.get("error", "")
        if "busy" not in error and "unable to send cookie" not in error:
            break
        time.sleep(0.25)
    if "error" in result:
        raise RuntimeError(f"iperf3 via {address}: {result['error']}")
    received = result["end"]["sum_received"]
    return {
        "gbit_s": received["bits_per_second"] / 1e9,
        "bytes": received["bytes"],
        "retransmits": result["end"].get("sum_sent", {}).get("retransmits"),
        "wall_s": wall,
        "proxy_cpu_pct": 100 * cpu / wall if pids else None,
        "proxy_cpu_s_per_gb": cpu / (received["bytes"] / 1e9) if pids else None,
        "proxy_rss_kib": memory.peak["rss_kib"] if pids else None,
        "proxy_pss_kib": memory.peak["pss_kib"] if pids else None,
    }


FLOOR_SOURCE = Path(__file__).with_name("floor_relay.c")


def floor_missing() -> str | None:
    return None if shutil.which("cc") else "no C compiler (cc) to build bench/floor_relay.c"


class FloorChain:
    """Two minimal C relays (``bench/floor_relay.c``: a thread per direction, blocking
    splice or read/write, nothing else) chained like a plain stream's two proxies in
    front of ``target``: the floor under what any proxy reaches on this machine.
    Built with ``cc`` into ``workdir``; the two processes are stopped on exit."""

    def __init__(self, mode: str, ports: tuple[int, int], target: str, workdir: Path):
        self.mode, self.ports, self.target, self.workdir = mode, ports, target, workdir
        self.procs: list[subprocess.Popen] = []
        self.address = f"127.0.0.1:{ports[0]}"

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def _binary(self) -> Path:
        binary = self.workdir / "floor_relay"
        if not binary.exists():
            subprocess.run(["cc", "-O2", "-pthread", "-o", str(binary), str(FLOOR_SOURCE)],
                           check=True, capture_output=True, timeout=120)
        return binary

    def __enter__(self) -> FloorChain:
        binary = self._binary()
        _, target_port = parse_address(self.target)
        # Producer side first (-> the app), then the consumer side (-> the producer side).
        hops = [(self.ports[1], target_port), (self.ports[0], self.ports[1])]
        try:
            for listen, to in hops:
                proc = subprocess.Popen([str(binary), self.mode, str(listen), str(to)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                self.procs.append(proc)
                if proc.stdout.readline().strip() != b"ready":
                    raise RuntimeError(f"floor relay on port {listen} did not start: "
                                       f"{proc.stderr.read(500).decode(errors='replace')}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self.procs = []


def tls_suite(address: str, openssl_conf: Path | None = None) -> str | None:
    """The TLS version and suite the listener at ``address`` picks for an OpenSSL client
    (configured by ``openssl_conf``, as the peer proxy would offer), from
    ``openssl s_client``; no client certificate is sent, so a mutually authenticating
    listener refuses the connection after the handshake and never reaches its app."""
    if shutil.which("openssl") is None:
        return None
    env = dict(os.environ)
    env.pop("OPENSSL_CONF", None)
    if openssl_conf is not None:
        env["OPENSSL_CONF"] = str(openssl_conf)
    try:
        proc = subprocess.run(["openssl", "s_client", "-connect", address, "-brief"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=15, env=env)
    except subprocess.TimeoutExpired:
        return None
    found = {}
    for line in (proc.stderr + proc.stdout).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Protocol version", "Ciphersuite"):
            found[key.strip()] = value.strip()
    if "Ciphersuite" not in found:
        return None
    return f"{found.get('Protocol version', '?')} {found['Ciphersuite']}"


# -- rounds and distributions ----------------------------------------------------------

def alternate(rounds: int, configs: list, run: Callable, on_error: Callable | None = None) -> dict:
    """Run every config once per round, in the same order each round (A B A B ...), so
    drift in the machine's load spreads over all configs alike. Returns
    ``{config: [results]}``; a run that raises RuntimeError is passed to ``on_error``
    (and left out) when given, else raised."""
    results: dict = {config: [] for config in configs}
    for index in range(rounds):
        for config in configs:
            try:
                results[config].append(run(config, index))
            except RuntimeError as exc:
                if on_error is None:
                    raise
                on_error(config, exc)
    return results


def distribution(values: list[float]) -> dict:
    """n, p50, p90, p99, min, max, mean of ``values`` (percentiles by linear
    interpolation between order statistics)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        pos = (len(ordered) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"n": len(ordered), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "min": ordered[0], "max": ordered[-1], "mean": statistics.fmean(ordered)}


def median(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# -- the machine, and result files -----------------------------------------------------

def _version(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0][:120] if text else None


def machine() -> dict:
    """What the figures depend on: cores, kernel, load, tool versions."""
    import ssl

    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "iperf3": _version(["iperf3", "--version"]),
        "stunnel": _version(["stunnel4", "-version"]),
        "haproxy": _version(["/usr/sbin/haproxy", "-v"]),
        "nginx": _version(["/usr/sbin/nginx", "-v"]),
    }


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def write_markdown(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path


def publish(args, name: str, stem: str, result: dict, text: str, readme_text: str | None = None,
            extra_files: Iterable[Path | None] = ()) -> int:
    """A bench's ending: ``<stem>.json`` and ``<stem>.md`` in ``args.out``, the README's
    ``bench:NAME`` section with ``--update-readme`` (``readme_text``, else ``text``),
    then the result as JSON with ``--json``, else ``text`` and the files written."""
    files = [write_json(args.out / f"{stem}.json", result),
             write_markdown(args.out / f"{stem}.md", text), *extra_files]
    if args.update_readme and not update_readme(name, readme_text or text):
        print(f"README.md has no <!-- bench:{name} --> markers", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        print("wrote", ", ".join(str(f) for f in files if f))
    return 0


def update_readme(name: str, text: str, readme: Path = README) -> bool:
    """Put ``text`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in the
    README (links made relative to the repository root); False if the markers are
    missing."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = text.replace("](../../", "](")
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_bars(path: Path, groups: list[str], series: dict[str, list[float | None]], *,
              title: str, ylabel: str) -> Path | None:
    """Grouped bars: one group per ``groups`` entry, one bar per series in each.
    None when matplotlib is not installed (``pip install 'scistream-prefect[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'scistream-prefect[bench]')",
              file=sys.stderr)
        return None
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 0.25 * len(series)), 4.2))
    for index, (label, values) in enumerate(series.items()):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Checks:
    """Targets evaluated on measured figures: met, not met, or not measured."""

    items: list[dict] = field(default_factory=list)

    def add(self, target: str, value: float | None, threshold: float | None,
            detail: str = "") -> None:
        if value is None or threshold is None:
            verdict = "not measured"
        else:
            verdict = "met" if value >= threshold else "not met"
        self.items.append({"target": target, "verdict": verdict, "value": value,
                           "threshold": threshold, "detail": detail})

    def add_at_most(self, target: str, value: float | None, limit: float | None,
                    detail: str = "") -> None:
        if value is None or limit is None:
            verdict = "not measured"
        else:
            verdict = "met" if value <= limit else "not met"
        self.items.append({"target": target, "verdict": verdict, "value": value,
                           "threshold": limit, "detail": detail})

    def markdown(self) -> str:
        rows = [[c["target"], f"**{c['verdict']}**", c["detail"]] for c in self.items]
        return markdown_table(["target", "verdict", "measured"], rows)

    def print(self) -> None:
        for c in self.items:
            print(f"  [{c['verdict']:>12}] {c['target']}: {c['detail']}")


def run_label(quick: bool, argv: list[str]) -> str:
    """The line every Markdown result starts with: when, how, and on what."""
    loads = os.getloadavg()
    load = ", ".join(f"{x:.2f}" for x in loads)
    kind = ("**quick run** (the `--quick` preset; few short rounds, figures are rough)"
            if quick else "full run")
    busy = (" The load average was above the CPU count (the bench's own iperf3 and "
            "proxies count in it, and any other work): compare ratios within this run only."
            if max(loads) > (os.cpu_count() or 1) else "")
    return (f"{kind}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{os.cpu_count()} CPUs, load average at the end {load}.{busy} "
            f"Command: `{' '.join(['.venv/bin/python', *argv])}`")
