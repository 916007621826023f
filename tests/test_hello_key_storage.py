"""The hello key stays out of Prefect's result storage, and the searches the leak tests
rely on (tests/recordkit.py) see what they must."""

from __future__ import annotations

import base64
import os
import secrets
import uuid

import pytest
from prefect import flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.settings import (
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_RESULTS_PERSIST_BY_DEFAULT,
    temporary_settings,
)

from scistream_prefect import open_stream, release_stream, stream_session

from recordkit import PAGE, encodings, files_containing, run_records


@pytest.mark.parametrize("before", [0, 1, 2, 3, 100])
def test_the_search_finds_a_secret_in_base64_at_any_alignment(tmp_path, before):
    secret = secrets.token_urlsafe(32)
    blob = os.urandom(before) + secret.encode() + os.urandom(7)
    (tmp_path / "standard").write_bytes(b'{"result": "' + base64.b64encode(blob) + b'"}')
    (tmp_path / "urlsafe").write_bytes(base64.urlsafe_b64encode(blob))
    (tmp_path / "lines").write_bytes(base64.encodebytes(blob))
    (tmp_path / "raw").write_bytes(blob)
    (tmp_path / "other").write_bytes(base64.b64encode(os.urandom(before) + b"x" * 43))
    assert [p.name for p in files_containing(tmp_path, secret)] == ["lines", "raw",
                                                                     "standard", "urlsafe"]
    assert len(encodings(secret)) == 7


@pytest.mark.slow
def test_the_search_reads_every_page_of_a_runs_log():
    marker = f"last line {uuid.uuid4()}"

    @flow
    def chatty():
        logger = get_run_logger()
        for line in range(2 * PAGE + 50):
            logger.info("line %d", line)
        logger.info(marker)

    state = chatty(return_state=True)
    messages = run_records(state.state_details.flow_run_id, expect=[marker]).messages()
    assert marker in messages
    assert {f"line {n}" for n in range(2 * PAGE + 50)} <= set(messages)


@pytest.mark.slow
def test_the_hello_key_is_in_no_persisted_result(gateways, producer_app, tmp_path):
    """With results persisted by default into a storage this test owns: the open-stream
    flow (key from a Secret block), and a session in a user's flow that returns its
    handle (key given directly). No stored file holds the key, as bytes or base64; the
    uids are found there the same way, so the search reads what was stored."""
    producer, consumer = gateways
    app = producer_app(2, 1024)
    key = secrets.token_urlsafe(32)
    Secret(value=key).save("test-persisted-hello-key", overwrite=True)
    storage = tmp_path / "results"

    @flow
    def pipeline():
        with stream_session(producer, consumer, num_conn=1, app_listeners=app.listeners,
                            uid=str(uuid.uuid4()), hello_key=key) as stream:
            return stream

    with temporary_settings({PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
                             PREFECT_LOCAL_STORAGE_PATH: storage}):
        opened = open_stream(producer, consumer, num_conn=1, app_listeners=app.listeners,
                             uid=str(uuid.uuid4()), hello_key_block="test-persisted-hello-key")
        release_stream(producer, consumer, opened.uid)
        held = pipeline()
    assert len({opened.uid, held.uid}) == 2
    for uid in (opened.uid, held.uid):
        assert files_containing(storage, uid), f"no stored result holds the handle of {uid}"
    assert files_containing(storage, key) == []
