"""Build the container images of the Docker backends, locally, FROM scratch.

No registry is needed: each image holds the Debian-packaged binary of this machine
(``/usr/sbin/haproxy``; ``/usr/sbin/nginx`` with its stream module), the shared
libraries ``ldd`` says they load, and a minimal ``/etc`` (passwd, group,
nsswitch.conf). Nothing else: no shell, no package manager::

    python -m scistream_proxy.images build            # both images
    python -m scistream_proxy.images build nginx      # one
    python -m scistream_proxy.images list             # what is there

The engine is ``DOCKER_HOST``, else the Docker SDK's standard socket.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from scistream_proxy.docker_backends import ProxyUnavailable, docker_client, docker_host

__all__ = ["IMAGES", "build_image", "image_tag"]

IMAGES = {
    "haproxy": {"package": "haproxy", "files": ["/usr/sbin/haproxy"],
                "entrypoint": ["/usr/sbin/haproxy"]},
    "nginx": {"package": "nginx-core", "files": ["/usr/sbin/nginx",
                                                 "/usr/lib/nginx/modules/ngx_stream_module.so"],
              "entrypoint": ["/usr/sbin/nginx"]},
}
IMAGE_REVISION = "1"  # bump when the image layout changes

_ETC = {
    "etc/passwd": "root:x:0:0:root:/:/nonexistent\nnobody:x:65534:65534:nobody:/:/nonexistent\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
}


def image_tag(kind: str) -> str:
    return f"scistream-{kind}:{IMAGE_REVISION}"


def shared_libraries(path: str) -> list[str]:
    """Absolute paths of the libraries (and loader) ``path`` loads, from ldd."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            found.append(match.group(1))
    return found


def _package_version(package: str) -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_context(kind: str) -> bytes:
    """The build context (a tar with the Dockerfile and the root file system)."""
    spec = IMAGES[kind]
    paths: list[str] = []
    for path in spec["files"]:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: apt-get install {spec['package']}"
                                    + (" libnginx-mod-stream" if kind == "nginx" else ""))
        paths.append(path)
        paths.extend(shared_libraries(path))
    version = _package_version(spec["package"])
    dockerfile = "\n".join([
        "FROM scratch",
        f'LABEL org.scistream.managed-image="{kind}" org.scistream.package="{spec["package"]}"'
        f' org.scistream.package-version="{version}"',
        "COPY rootfs/ /",
        f"ENTRYPOINT {json.dumps(spec['entrypoint'])}",
        "",
    ])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        add_bytes("Dockerfile", dockerfile.encode())
        for name, text in _ETC.items():
            add_bytes(f"rootfs/{name}", text.encode())
        for path in sorted(set(paths)):
            real = Path(path).resolve()  # copy the file a symlink names, under its own name
            add_bytes(f"rootfs{path}", real.read_bytes(), 0o755)
        # Writable mount points of a read-only container.
        for directory in ("run/scistream", "etc/scistream", "tmp"):
            info = tarfile.TarInfo(f"rootfs/{directory}")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    return buf.getvalue()


def build_image(kind: str, client=None) -> str:
    """Build one image; returns its tag."""
    own = client is None
    client = client or docker_client(timeout_s=300)
    try:
        context = io.BytesIO(build_context(kind))
        client.images.build(fileobj=context, custom_context=True, tag=image_tag(kind), rm=True,
                            forcerm=True, pull=False)
    finally:
        if own:
            client.close()
    return image_tag(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream_proxy.images",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build images from this machine's packages")
    build.add_argument("kinds", nargs="*", metavar="KIND",
                       help=f"which images, of {', '.join(IMAGES)} (default: all)")
    sub.add_parser("list", help="show the images and whether they are present")
    args = parser.parse_args(argv)
    unknown = [k for k in getattr(args, "kinds", []) if k not in IMAGES]
    if unknown:
        parser.error(f"unknown image kinds {unknown}; known: {list(IMAGES)}")
    try:
        client = docker_client(timeout_s=300)
    except ProxyUnavailable as exc:
        print(f"scistream images: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "build":
            for kind in args.kinds or list(IMAGES):
                try:
                    tag = build_image(kind, client)
                except (FileNotFoundError, subprocess.CalledProcessError) as exc:
                    print(f"scistream images: {kind}: {exc}", file=sys.stderr)
                    return 1
                size = client.images.get(tag).attrs.get("Size", 0)
                print(f"built {tag} ({size / 1e6:.1f} MB) on {docker_host()}")
        else:
            from docker.errors import ImageNotFound

            for kind in IMAGES:
                try:
                    client.images.get(image_tag(kind))
                    print(f"{image_tag(kind)}: present")
                except ImageNotFound:
                    print(f"{image_tag(kind)}: missing")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
