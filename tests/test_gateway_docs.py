"""The operator's guide stays true: every `scistream-gateway` command it shows parses
with the real command line, and the render-config examples produce configs that
globus-compute-endpoint loads."""

from __future__ import annotations

import json
import re
import shlex
import uuid
from pathlib import Path

from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

from scistream_gateway.cli import build_parser, main
from scistream_gateway.functions import ALL

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "operator.md"


def _documented_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("#", 1)[0].strip()
            if command.startswith("scistream-gateway "):
                commands.append(shlex.split(command)[1:])
    return commands


def test_every_documented_command_parses():
    commands = _documented_commands()
    assert {c[0] for c in commands} == {"register", "render-config", "info", "streams", "release"}
    for argv in commands:
        build_parser().parse_args(argv)  # SystemExit (a failed test) on an unknown option


def test_documented_render_config_examples_work(tmp_path):
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps({name: str(uuid.uuid4()) for name in ALL}))
    mapping = tmp_path / "identity_mapping.json"
    mapping.write_text("[]")
    for argv in (c for c in _documented_commands() if c[0] == "render-config"):
        out = tmp_path / ("multi" if "--multi-user" in argv else "single")
        replaced = {"--functions": str(functions), "--output-dir": str(out),
                    "--identity-mapping": str(mapping)}
        argv = [replaced.get(prev, arg) for prev, arg in zip([None, *argv[:-1]], argv, strict=True)]
        assert main(argv) == 0
        config = load_config_yaml((out / "config.yaml").read_text())
        if getattr(config, "engine", None) is not None:
            config.engine.shutdown()
        assert len(config.allowed_functions) == 9
