"""Port holder: keeps a stream's listening sockets from ``reserve`` until its proxy runs.

External proxies (stunnel, HAProxy, nginx, their containers) only get their config at
``connect``, but the kernel must hold the stream's ports from ``reserve`` on. A holder
is a small detached process that inherits the listening sockets the gateway bound and
answers on ``holder.sock`` in the stream's 0700 directory:

``fds``      reply with the listening sockets themselves (SCM_RIGHTS); a subprocess
             proxy inherits those very sockets, so there is no moment when a port is
             unbound and connections already queued in the backlog are kept;
``steer``    (sockets bound with SO_REUSEPORT, for containers, which cannot inherit a
             descriptor) attach a classic-BPF program to each port's reuseport group
             that sends every new connection to the group's second socket, i.e. the
             proxy's own once it has bound the port;
``release``  close the sockets and exit. Connections still queued at the holder are
             accepted and reset (counted in the log), never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from pathlib import Path

from scistream_proxy.daemon import become_daemon

CONTROL_SOCKET = "holder.sock"
SO_ATTACH_REUSEPORT_CBPF = 51
# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}: BPF_RET | BPF_K (0x06), return 1.
_STEER_TO_SECOND = struct.pack("HBBI", 0x06, 0, 0, 1)


def _attach_steering(sock: socket.socket) -> None:
    import ctypes

    program = ctypes.create_string_buffer(_STEER_TO_SECOND, len(_STEER_TO_SECOND))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, native layout.
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _reset_queued(sock: socket.socket) -> int:
    """Accept whatever is still queued on a listener and reset it; return how many."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return count
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        count += 1


def serve(listeners: list[socket.socket], control: socket.socket) -> None:
    while True:
        conn, _ = control.accept()
        with conn:
            conn.settimeout(5)
            try:
                request = json.loads(conn.makefile("rb").readline())
                op = request.get("op")
                if op == "fds":
                    reply = json.dumps({"ok": True, "count": len(listeners)}).encode() + b"\n"
                    socket.send_fds(conn, [reply], [s.fileno() for s in listeners])
                    continue
                if op == "steer":
                    for sock in listeners:
                        _attach_steering(sock)
                    reply_obj = {"ok": True}
                elif op in ("release", "status"):
                    reply_obj = {"ok": True, "pid": os.getpid()}
                else:
                    reply_obj = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as exc:  # noqa: BLE001 - report, keep holding
                reply_obj, op = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
            if op == "release":
                reset = sum(_reset_queued(s) for s in listeners)
                if reset:
                    print(f"holder: reset {reset} connection(s) that reached the port before "
                          "the proxy took it over", file=sys.stderr, flush=True)
                for sock in listeners:
                    sock.close()
                reply_obj["reset"] = reset
            try:
                conn.sendall(json.dumps(reply_obj).encode() + b"\n")
            except OSError:
                pass
        if op == "release":
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scistream_proxy.holder",
        description="Hold one stream's listening sockets until its proxy takes them over "
        "(started by a gateway, not by hand).",
    )
    parser.add_argument("--stream-dir", required=True, type=Path)
    parser.add_argument("--fds", required=True, help="comma-separated inherited listening fds")
    parser.add_argument("--ready-fd", type=int, default=-1)
    args = parser.parse_args(argv)

    report = become_daemon(args.ready_fd)

    try:
        os.chdir(args.stream_dir)
        listeners = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",")]
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        Path(CONTROL_SOCKET).unlink(missing_ok=True)
        control.bind(CONTROL_SOCKET)
        control.listen(8)
    except Exception as exc:  # noqa: BLE001 - the starter gets the reason
        report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    report({"pid": os.getpid()})
    serve(listeners, control)
    Path(CONTROL_SOCKET).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
