"""The blocks as Prefect sees them: collection entry point, registration, descriptions, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from prefect.client.orchestration import get_client

SLUGS = {
    "scistream-local-gateway": "LocalGateway",
    "scistream-globus-compute-gateway": "GlobusComputeGateway",
    "scistream-globus-credentials": "GlobusCredentials",
}


def test_the_package_is_a_prefect_collection():
    from prefect.plugins import load_prefect_collections

    found = {ep.name: ep.value for ep in entry_points(group="prefect.collections")}
    assert found.get("scistream_prefect") == "scistream_prefect.blocks"
    assert "scistream_prefect" in load_prefect_collections()


@pytest.mark.slow
def test_prefect_block_register_finds_every_block(tmp_path):
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m",
                           "scistream_prefect.blocks"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with get_client(sync_client=True) as client:
        for slug in SLUGS:
            block_type = client.read_block_type_by_slug(slug)
            assert block_type.description, slug
            schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
            fields = schema.fields["properties"]
            assert fields and all(f.get("description") for f in fields.values()), (slug, fields)
    with get_client(sync_client=True) as client:
        creds = client.read_block_type_by_slug("scistream-globus-credentials")
        schema = client.get_most_recent_block_schema_for_block_type(creds.id)
        assert schema.fields["secret_fields"] == ["client_secret"]


@pytest.mark.parametrize("slug, name", SLUGS.items())
def test_every_block_field_is_described(slug, name):
    import scistream_prefect

    block = getattr(scistream_prefect, name)
    assert block.get_block_type_slug() == slug
    assert block.get_description()
    for field, info in block.model_fields.items():
        assert info.description, f"{name}.{field} has no description"


def test_a_saved_credentials_block_keeps_its_secret_secret():
    import uuid

    from scistream_prefect import GlobusCredentials

    GlobusCredentials(client_id=str(uuid.uuid4()), client_secret="very-secret").save(
        "block-test", overwrite=True)
    loaded = GlobusCredentials.load("block-test")
    assert loaded.client_secret.get_secret_value() == "very-secret"
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name("block-test", "scistream-globus-credentials",
                                                      include_secrets=False)
    assert "very-secret" not in str(document.data)
