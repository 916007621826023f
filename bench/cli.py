"""The ``scistream`` command's speed: each command as a whole process, as a user's shell
runs it, against two local gateways named by settings files.

    .venv/bin/python bench/cli.py [--runs 20] [--num-conn 4] [--port-base 16500]
        [--out bench/results] [--update-readme] [--json]

Every run starts each command in a fresh interpreter, in this order (A B A B rounds, so
drift in the machine's load spreads over all of them alike), after one untimed round
(bytecode is written then, as an installed package has it, whatever
``PYTHONDONTWRITEBYTECODE`` says in the caller's environment): ``python -c pass`` and
``python -c "import prefect"`` (for comparison), ``scistream --help``, then one stream's
life: ``open --json`` (no Prefect server: the direct path), ``status``, ``renew``,
``list`` and ``release``. Wall time from the process's start to its exit; p50 and p95
over the runs, next to the goals of issue 17, and the p50 of its CPU time (user +
system), which the load of a shared machine inflates less. ``list`` is left out (and said so) where
the gateway has no ``list_streams`` function. Results: ``<out>/cli.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

# command -> issue 17's goal for its p50, seconds (None: shown for comparison)
GOALS = {
    "python -c pass": None,
    'python -c "import prefect"': None,
    "scistream --help": 0.3,
    "scistream open ... --json": 1.0,
    "scistream status": 0.4,
    "scistream renew": 0.4,
    "scistream list": 0.4,
    "scistream release": 0.4,
}


def _percentile(ordered: list[float], q: float) -> float:
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _gateways(root: Path, port_base: int, num_conn: int) -> tuple[str, str]:
    from scistream_gateway.settings import GatewaySettings

    paths = []
    for index, name in enumerate(("bench-cli-p", "bench-cli-c")):
        state = root / name
        state.mkdir(mode=0o700)
        base = port_base + index * (num_conn + 10)
        settings = GatewaySettings(name=name, state_dir=state, lan_address="127.0.0.1",
                                   wan_address="127.0.0.1", port_min=base,
                                   port_max=base + num_conn + 9)
        (state / "gateway.toml").write_text(settings.to_toml())
        paths.append(str(state / "gateway.toml"))
    return paths[0], paths[1]


def _timed(argv: list[str], env: dict, cpu: list[float]) -> tuple[float, str]:
    """Run ``argv``; its wall time and stdout. Its CPU time (user + system, of the
    process and what it waited for) is appended to ``cpu``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return took, proc.stdout


def run(args: argparse.Namespace) -> dict:
    from scistream_gateway.protocol import FUNCTIONS

    python = sys.executable
    command = [str(Path(python).with_name("scistream"))]
    if not Path(command[0]).exists():
        command = [python, "-m", "scistream_prefect.cli"]
    times: dict[str, list[float]] = {name: [] for name in GOALS}
    cpu: dict[str, list[float]] = {name: [] for name in GOALS}
    has_list = "list_streams" in FUNCTIONS
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        root = Path(tmp)
        prod, cons = _gateways(root, args.port_base, args.num_conn)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PREFECT_API_URL", "PREFECT_PROFILE", "XDG_STATE_HOME",
                            "PYTHONDONTWRITEBYTECODE")}
        env.update(HOME=str(root / "home"), PREFECT_HOME=str(root / "prefect-home"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        both = ["--gateway", prod, "--gateway", cons]
        for round_ in range(1 + args.runs):  # round 0 warms up: not counted
            def timed(name: str, argv: list[str]) -> str:
                took, out = _timed(argv, env, cpu[name])
                times[name].append(took)
                return out

            timed("python -c pass", [python, "-c", "pass"])
            timed('python -c "import prefect"', [python, "-c", "import prefect"])
            timed("scistream --help", [*command, "--help"])
            uid = json.loads(timed("scistream open ... --json", [
                *command, "open", "--producer", prod, "--consumer", cons, "--num-conn",
                str(args.num_conn), "--app-listener", "127.0.0.1:9", "--json"]))["uid"]
            try:
                timed("scistream status", [*command, "status", uid, *both])
                timed("scistream renew", [*command, "renew", uid, *both, "--lease", "600"])
                if has_list:
                    timed("scistream list", [*command, "list", *both])
            finally:
                timed("scistream release", [*command, "release", uid, *both])
            if round_ == 0:
                for name in GOALS:
                    times[name].clear()
                    cpu[name].clear()
        leftovers = benchlib.stop_leftovers(root)  # none: each release stopped its proxies
    rows = {}
    for name, values in times.items():
        ordered = sorted(values)
        rows[name] = ({"n": len(ordered), "p50": _percentile(ordered, 0.5),
                       "p95": _percentile(ordered, 0.95), "min": ordered[0],
                       "max": ordered[-1], "cpu_p50": _percentile(sorted(cpu[name]), 0.5),
                       "goal_p50": GOALS[name]}
                      if ordered else {"n": 0, "goal_p50": GOALS[name]})
    return {"bench": "cli", "runs": args.runs, "num_conn": args.num_conn,
            "machine": benchlib.machine(), "commands": rows, "leftover_pids": leftovers,
            "skipped": [] if has_list else [
                "scistream list: the gateway has no list_streams function yet"]}


def markdown(result: dict, label_line: str) -> str:
    table = []
    for name, row in result["commands"].items():
        goal = row["goal_p50"]
        if row["n"] == 0:
            table.append([f"`{name}`", 0, "-", "-", "-", "-" if goal is None else f"<= {goal}",
                          "not run"])
            continue
        verdict = "" if goal is None else ("**met**" if row["p50"] <= goal else "not met")
        table.append([f"`{name}`", row["n"], f"{row['p50']:.3f}", f"{row['p95']:.3f}",
                      f"{row['cpu_p50']:.3f}", "-" if goal is None else f"<= {goal}", verdict])
    text = [label_line, "",
            f"Each command a fresh process (wall time, seconds), two local gateways named by "
            f"settings files, no Prefect server (`open` takes the direct path), "
            f"num_conn {result['num_conn']}. Method: [docs/benchmarks.md](docs/benchmarks.md).",
            "", benchlib.markdown_table(["command", "n", "p50", "p95", "CPU p50", "goal (p50)",
                                         "verdict"], table),
            "", "CPU: user + system seconds of the command's process (what it waited for "
            "included), which the load of a shared machine inflates much less than wall time; "
            "the verdicts are on wall time."]
    if result["skipped"]:
        text += ["", "Not measured: " + "; ".join(result["skipped"]) + "."]
    return "\n".join(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds (default 20)")
    parser.add_argument("--num-conn", type=int, default=4, help="the stream's connections")
    parser.add_argument("--port-base", type=int, default=16500,
                        help="gateway ports: 2 x (num_conn + 10) from here")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--update-readme", action="store_true",
                        help="put the table into README.md's <!-- bench:cli --> section")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.num_conn < 1:
        parser.error("--runs and --num-conn must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    label_line = result["label"] = benchlib.run_label(
        False, ["bench/cli.py", *(sys.argv[1:] if argv is None else argv)])
    text = markdown(result, label_line)
    return benchlib.publish(args, "cli", "cli", result, text)


if __name__ == "__main__":
    sys.exit(main())
