"""The Globus Auth stand-in: fauxbus, seeded with the clients a test names, as a process.

fauxbus 0.4 serves what the real clients here need from Auth: the client-credentials
grant (globus-sdk's ``ClientApp``, the endpoint daemon), introspection and revocation
(the web-service stand-in checks every bearer token). Two things it lacks, added here
here:

- The Compute scope (``https://auth.globus.org/scopes/facd7ccc-.../all``) is issued for
  the resource server ``funcx_service``, as Globus Auth does: fauxbus derives the
  server from the scope URL, and the SDK then finds no token for ``funcx_service``.
- ``userinfo`` answers for a client's own token (the client is its identity, one
  entry in its identity set), as Globus Auth does: a single-user endpoint asks for it
  at start to learn whose start commands to honour; fauxbus only answers for people.
- The client-credentials grant issues tokens for ``openid`` scopes too (without an ID
  token), as Globus Auth does for the SDK's ``ClientApp``, which asks for them; fauxbus
  refuses that with a 501 (unrecorded, it says).

The first two subclass fauxbus's ``World``; the third replaces the grant's handler.

Run: ``PYTHONPATH=tests python -m world.auth_service --listen HOST:PORT --seed FILE``
(``tests`` cannot be a package name here: globus-compute-endpoint installs one). It
prints ``ready http://HOST:PORT`` once listening. :class:`AuthService` does that for a
test, with ``argv_prefix`` to run it inside a network namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["AuthService", "ReadyProcess", "COMPUTE_RESOURCE_SERVER"]

COMPUTE_RESOURCE_SERVER = "funcx_service"
COMPUTE_SCOPE_SERVER = "facd7ccc-c5f4-42aa-916b-a0e270e2c2a9"
TESTS_DIR = Path(__file__).resolve().parent.parent


class ReadyProcess:
    """A stand-in process that prints ``ready <url>`` on stdout once it serves.

    Its environment: ``env`` if given (the whole of it), else this process's. Stops
    with SIGTERM (SIGKILL after a grace); its output goes to ``log_path``."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None,
                 log_path: Path, timeout_s: float = 60.0):
        self.log_path = log_path
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), *filter(None, [full_env.get("PYTHONPATH")])])
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._log)
        deadline = time.monotonic() + timeout_s
        line = b""
        while not line.startswith(b"ready "):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[2:4]} did not start:\n{self.log_tail()}")
        self.url = line.split()[1].decode()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self._log.close()


class AuthService:
    """fauxbus with the named confidential clients, as a process.

    ``clients`` maps a name to nothing: each gets a fresh client id (a UUID, which in
    Globus Auth is also the client's identity) and secret, in :attr:`clients` as
    ``name -> (client_id, secret)``. The seed file is private to the owner (0600).
    """

    def __init__(self, client_names: list[str], *, host: str = "127.0.0.1", port: int = 0,
                 argv_prefix: list[str] | None = None, workdir: Path | None = None):
        self.clients = {name: (str(uuid.uuid4()), secrets.token_urlsafe(24))
                        for name in client_names}
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="auth-")
        self.workdir = Path(workdir or self._tmp.name)
        seed = self.workdir / "auth-seed.json"
        fd = os.open(seed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"clock": int(time.time()), "clients": {
                cid: {"secret": secret, "name": name}
                for name, (cid, secret) in self.clients.items()}}, f)
        self.process = ReadyProcess(
            [*(argv_prefix or []), sys.executable, "-m", "world.auth_service",
             "--listen", f"{host}:{port}", "--seed", str(seed)],
            log_path=self.workdir / "auth.log")
        self.url = self.process.url

    def stop(self) -> None:
        self.process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def _world_class():
    from fauxbus.auth import AUTH_RESOURCE_SERVER
    from fauxbus.world import World

    class ComputeAwareWorld(World):
        """fauxbus's World with the two additions the module docstring names."""

        def scopes_by_resource_server(self, scopes):
            by_server = super().scopes_by_resource_server(scopes)
            if COMPUTE_SCOPE_SERVER in by_server:
                by_server[COMPUTE_RESOURCE_SERVER] = by_server.pop(COMPUTE_SCOPE_SERVER)
            return by_server

        def userinfo_token(self, token):
            issued = self.active_token(token) if token else None
            if (issued is not None and issued.account is None
                    and issued.resource_server == AUTH_RESOURCE_SERVER
                    and "openid" in issued.scopes):
                return issued
            return super().userinfo_token(token)

        def userinfo(self, issued):
            if issued.account is not None:
                return super().userinfo(issued)
            client = self.clients.get(issued.client_id)
            identity = {"sub": issued.identity_id, "username": issued.username,
                        "name": client.name if client else None, "email": None,
                        "organization": None, "identity_provider": None,
                        "identity_provider_display_name": None}
            return {**identity, "preferred_username": issued.username,
                    "last_authentication": None, "identity_set": [identity]}

    return ComputeAwareWorld


def _client_credentials_with_openid(ctx, client, form, grant_type):
    """fauxbus's client-credentials grant, minus its refusal of ``openid``."""
    from fauxbus import auth_api
    from fauxbus.auth import split_scopes

    scopes = split_scopes(form.get("scope", ""))
    if "openid" not in scopes:
        return _FAUXBUS_CLIENT_CREDENTIALS(ctx, client, form, grant_type)
    auth_api._refuse_refresh_requests(form, scopes)
    issued = [ctx.world.issue_token(client, resource_server=server, scopes=server_scopes,
                                    grant_type=grant_type)
              for server, server_scopes in ctx.world.scopes_by_resource_server(scopes).items()]
    return 200, ctx.world.token_response(issued[0], issued[1:])


_FAUXBUS_CLIENT_CREDENTIALS = None


def main(argv: list[str] | None = None) -> int:
    global _FAUXBUS_CLIENT_CREDENTIALS
    from fauxbus import auth_api
    from fauxbus.server import make_server

    _FAUXBUS_CLIENT_CREDENTIALS = auth_api._client_credentials
    auth_api._client_credentials = _client_credentials_with_openid

    parser = argparse.ArgumentParser(prog="world.auth_service", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free)")
    parser.add_argument("--seed", type=Path, required=True, help="fauxbus seed document")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    world = _world_class()()
    seed = json.loads(args.seed.read_text())
    world.load(seed)
    server = make_server(host.strip("[]"), int(port), world=world, canonical_seed=seed,
                         require_issued_tokens=True)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"ready http://{shown}:{bound_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    raise SystemExit(main())
