"""How proxies are launched so that they outlive the endpoint: a transient systemd scope
where systemd manages the machine, a direct launch otherwise, and the warning
gateway_info gives when streams would not survive an endpoint restart.

systemd is not the service manager on the test machine (PID 1 is not systemd), so a
scope cannot really be made here. What runs for real: detection, the exact command
line, the real ``systemd-run`` failing and the fallback, and a launch through a
stand-in ``systemd-run`` that does what ``--scope`` does to the command (exec it in
place), which proves descriptors and the ready handshake pass through that command
line."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from scistream_proxy.process import (
    LAUNCH_ENV,
    LaunchPlan,
    ProcessIdentity,
    ProxyStartError,
    launch_plan,
    scope_command,
    spawn_detached,
    survival_report,
    terminate,
)

# A stand-in daemon: forks away like the native proxy, reports ready, sleeps.
DAEMON = ("import json, os, sys, time\n"
          "fd = int(sys.argv[sys.argv.index('--ready-fd') + 1])\n"
          "if os.fork(): os._exit(0)\n"
          "os.write(fd, (json.dumps({'pid': os.getpid()}) + '\\n').encode()); os.close(fd)\n"
          "time.sleep(600)  # scistream-launch-test\n")


def test_scope_command_line():
    argv = ["/usr/bin/python3", "-P", "-m", "scistream_proxy.native_daemon",
            "--stream-dir", "/var/lib/scistream/streams/u", "--ready-fd", "7"]
    assert scope_command(argv, user=False, description="scistream proxy /x") == [
        "systemd-run", "--scope", "--quiet", "--collect",
        "--description=scistream proxy /x", "--", *argv]
    assert scope_command(argv, user=True, description="d", systemd_run="/usr/bin/systemd-run")[
        :3] == ["/usr/bin/systemd-run", "--user", "--scope"]


def test_launch_plan_detection(tmp_path):
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    fake_binary = sys.executable  # any executable path: detection only looks
    if os.getuid() == 0:  # root uses the system manager; no user bus needed
        assert launch_plan({}, booted, fake_binary) == LaunchPlan(
            "systemd", None, user=False, systemd_run=fake_binary)
    assert launch_plan({"SCISTREAM_PROXY_LAUNCH": "direct"}, booted, fake_binary).mode == "direct"
    missing = launch_plan({}, tmp_path / "absent", fake_binary)
    assert missing.mode == "direct" and "absent" in missing.reason and not missing.required
    required = launch_plan({"SCISTREAM_PROXY_LAUNCH": "systemd"}, tmp_path / "absent",
                           fake_binary)
    assert required.mode == "direct" and required.required
    if not Path("/run/systemd/system").is_dir():
        here = launch_plan()
        assert here.mode == "direct" and "/run/systemd/system" in here.reason


def test_survival_report_warns_inside_a_service_cgroup():
    direct = LaunchPlan("direct", "systemd-run is not installed")
    unit = "/system.slice/globus-compute-endpoint-gw.service"
    report = survival_report(direct, unit)
    assert report["survives_endpoint_restart"] is False
    assert "globus-compute-endpoint-gw.service" in report["warning"]
    assert "endpoint_configs/systemd" in report["warning"]
    assert survival_report(LaunchPlan("systemd"), unit)["warning"] is None
    assert survival_report(direct, "/")["survives_endpoint_restart"] is True
    # A user's own manager is not an endpoint service.
    assert survival_report(direct, "/user.slice/user-1000.slice/user@1000.service/app.slice"
                           )["warning"] is None


def test_gateway_info_reports_how_proxies_are_launched(gateway_root, monkeypatch):
    """Two launch settings whose outcome is known here: a direct launch, outside any
    endpoint's service unit, warns of nothing; systemd asked for where no scope can be
    made is the one warning, that every reserve will fail."""
    from conftest import make_gateway

    monkeypatch.setenv(LAUNCH_ENV, "direct")  # the gateway's workers inherit it
    info = make_gateway(gateway_root, "direct-gw").call("gateway_info", {})
    assert info["proxy_launch"]["launch"] == "direct"
    assert info["proxy_launch"]["warning"] is None and info["warnings"] == []
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd manages this machine: a scope can be made here")
    monkeypatch.setenv(LAUNCH_ENV, "systemd")
    info = make_gateway(gateway_root, "systemd-gw").call("gateway_info", {})
    assert info["proxy_launch"]["launch"] == "direct"
    (warning,) = info["warnings"]
    assert warning.startswith(f"{LAUNCH_ENV}=systemd but no systemd scope can be made here")
    assert warning.endswith("every reserve will fail")


def _standin_systemd_run(tmp_path: Path) -> Path:
    """Records its argv, then does to the command what `systemd-run --scope` does."""
    script = tmp_path / "systemd-run"
    record = tmp_path / "systemd-run.argv"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        "assert '--scope' in sys.argv\n"
        "command = sys.argv[sys.argv.index('--') + 1:]\n"
        "os.execvp(command[0], command)\n")
    script.chmod(0o755)
    return script


def _stop(identity: ProcessIdentity) -> None:
    terminate(identity, grace_s=0.0)
    assert not identity.alive()


def test_launch_through_a_scope_command_line_keeps_the_ready_handshake(tmp_path):
    standin = _standin_systemd_run(tmp_path)
    plan = LaunchPlan("systemd", systemd_run=str(standin))
    identity = spawn_detached([sys.executable, "-c", DAEMON], cwd=tmp_path,
                              log_path=tmp_path / "log", plan=plan)
    try:
        assert identity.alive()
        argv = json.loads((tmp_path / "systemd-run.argv").read_text())
        assert argv[:4] == ["--scope", "--quiet", "--collect", f"--description=scistream proxy "
                                                                 f"{tmp_path}"]
        assert argv[argv.index("--") + 1:][:2] == [sys.executable, "-c"]
    finally:
        _stop(identity)


@pytest.mark.skipif(shutil.which("systemd-run") is None, reason="needs systemd-run (systemd)")
def test_real_systemd_run_failing_falls_back_to_a_direct_launch(tmp_path):
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs here, so systemd-run would not fail")
    plan = LaunchPlan("systemd", systemd_run=shutil.which("systemd-run"))
    identity = spawn_detached([sys.executable, "-c", DAEMON], cwd=tmp_path,
                              log_path=tmp_path / "log", plan=plan)
    try:
        assert identity.alive()
        log = (tmp_path / "log").read_text()
        assert "systemd scope failed" in log and "starting directly" in log
    finally:
        _stop(identity)
    # When a scope is required, there is no silent fallback.
    required = LaunchPlan("systemd", systemd_run=shutil.which("systemd-run"), required=True)
    with pytest.raises(ProxyStartError, match="SCISTREAM_PROXY_LAUNCH=systemd forbids"):
        spawn_detached([sys.executable, "-c", DAEMON], cwd=tmp_path,
                       log_path=tmp_path / "log2", plan=required)


def test_required_scope_refusal_reaches_the_caller_as_conn_error(gateway_root):
    """A gateway told to launch proxies only in scopes (the shipped drop-in) refuses a
    reservation it cannot make survivable, and leaks nothing."""
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs here, so a scope would be made")
    from conftest import make_gateway
    from gatewaykit import ProvenEngine
    from scistream_gateway.settings import CONFIG_ENV

    gw = make_gateway(gateway_root, "scope-only")
    env = {CONFIG_ENV: str(gw.settings_path), "SCISTREAM_PROXY_LAUNCH": "systemd"}
    with ProvenEngine(env, max_workers=1) as engine:
        reply = engine.call("reserve", {"uid": "0b5c4a1e-5f8a-4c1e-9d43-2f1f6ad2c7a1",
                                        "role": "PROD", "num_conn": 2, "key_sha256": "0" * 64})
        assert reply["error"]["code"] == "CONN_ERROR", reply
        assert "systemd" in reply["error"]["message"]
        info = engine.call("gateway_info", {})
        assert info["active_streams"] == 0 and info["free_ports"] == 40
        assert "every reserve will fail" in info["warnings"][0]
    assert list((gw.settings.state_dir / "streams").iterdir()) == []


def test_a_proxy_that_exits_before_reporting_says_so(tmp_path):
    program = "import sys; print('no such key file', file=sys.stderr); sys.exit(3)"
    with pytest.raises(ProxyStartError, match="exited with 3 before reporting ready"):
        spawn_detached([sys.executable, "-c", program], cwd=tmp_path, log_path=tmp_path / "log",
                       plan=LaunchPlan("direct"))
    assert "no such key file" in (tmp_path / "log").read_text()
