"""Bad input through the client's real call paths (hypothesis): the Globus Compute
serializer and a LocalGateway worker, and every Prefect task of
``scistream_prefect.tasks``. Each bad input is refused with a SciStream code (never
``SERVER_ERR``, never another exception) and leaves the gateway's state byte for byte
as it was.

``test_gateway_properties`` already drives the functions themselves with arbitrary
JSON; this adds what only the call path sees: data the serializer cannot carry (sets,
bytes, non-string keys, NaN, deep nesting), unknown function names, and each task's
own arguments (gateways that are not gateways, keys, lists given as strings, wait
times that would never end). ``SCISTREAM_BAD_INPUT_EXAMPLES`` sets the examples per
test (default 40).
"""

from __future__ import annotations

import hashlib
import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream_gateway.errors import ERROR_CODES, SciStreamError
from scistream_prefect import tasks

from conftest import make_gateway
from badinputkit import APP, HYPOTHESIS, KEY, dump_state

pytestmark = pytest.mark.slow

class World:
    """A LocalGateway with one stream in HELLO state (so nothing valid would wait)."""

    def __init__(self, root):
        self.gateway = make_gateway(root, "bad-input-gw", size=16, max_num_conn=8)
        self.state_dir = self.gateway.settings.state_dir
        self.uid, self.reply = "", {}

    def ensure_stream(self) -> None:
        if self.uid:
            try:
                if self.gateway.call("status", {"uid": self.uid})["state"] == "HELLO":
                    return
            except SciStreamError:
                pass
            self.gateway.call("release", {"uid": self.uid})
        self.uid = str(uuid.uuid4())
        self.reply = self.gateway.call("reserve", {
            "uid": self.uid, "role": "PROD", "num_conn": 2, "lease_s": 3600,
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()})
        self.gateway.call("hello", {"uid": self.uid, "key": KEY, "role": "PROD",
                                    "app_listeners": [APP]})

    def close(self) -> None:
        if self.uid:
            self.gateway.call("release", {"uid": self.uid})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from scistream_proxy.leaks import proxy_pids

    root = tmp_path_factory.mktemp("bad-input")
    w = World(root)
    w.ensure_stream()
    yield w
    w.close()
    assert proxy_pids(under=root) == []


def refused(call) -> SciStreamError:
    """Run ``call``; it must raise a SciStream error that is not SERVER_ERR."""
    try:
        result = call()
    except SciStreamError as exc:
        assert exc.code in ERROR_CODES and exc.code != "SERVER_ERR", exc
        assert exc.message
        return exc
    raise AssertionError(f"accepted: {result!r}")


# -- the serializer and worker path ------------------------------------------------
not_json = st.recursive(
    st.sets(st.integers(), min_size=1, max_size=3) | st.binary(min_size=1, max_size=8)
    | st.just(float("nan")) | st.just(float("inf")) | st.just(object()) | st.complex_numbers(),
    lambda inner: st.lists(inner, min_size=1, max_size=3)
    | st.dictionaries(st.integers() | st.tuples(st.integers()), inner, min_size=1, max_size=2),
    max_leaves=4,
)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@HYPOTHESIS
@given(data=st.data())
def test_what_the_serializer_cannot_carry_is_refused_and_changes_nothing(world, data):
    from scistream_gateway.functions import ALL

    world.ensure_stream()
    name = data.draw(st.sampled_from(sorted(ALL)), label="function")
    field = data.draw(st.sampled_from(["uid", "num_conn", "app_listeners", "lease_s",
                                       "remote_listeners", "timeout_s", "control",
                                       "owner"]), label="field")
    value = data.draw(not_json | st.sampled_from([_nested(5000), "x" * (2 << 20)]),
                      label="value")
    request = {"uid": world.uid, field: value}
    before = dump_state(world.state_dir)
    refused(lambda: world.gateway.call(name, request))
    assert dump_state(world.state_dir) == before


@HYPOTHESIS
@given(name=st.text(max_size=30).filter(lambda n: n not in {
    "gateway_info", "reserve", "hello", "wait_hello", "connect", "status", "renew",
    "release", "list_streams"}))
def test_an_unknown_function_is_refused(world, name):
    before = dump_state(world.state_dir)
    error = refused(lambda: world.gateway.call(name, {}))
    assert error.code == "BAD_FORMAT"
    assert dump_state(world.state_dir) == before


# -- the tasks ----------------------------------------------------------------------
def _not_a_uid(text: object) -> bool:
    try:
        return str(uuid.UUID(text)) != text
    except (TypeError, ValueError, AttributeError):
        return True


anything = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) \
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(),
                                                           max_size=2)
bad_addresses = st.lists(st.sampled_from(["", ":80", "host name:80", "127.0.0.1:0",
                                          "127.0.0.1:65536", "::1:80", "x:1;rm -rf /"])
                         | st.text(max_size=12).filter(lambda t: ":" not in t),
                         min_size=1, max_size=3)
BAD = {
    "gateway": anything | st.just(object()),
    "uid": anything.filter(_not_a_uid),
    "role": anything.filter(lambda r: r not in ("PROD", "CONS")),
    "num_conn": st.integers(max_value=0) | st.integers(min_value=9, max_value=10**6)
                | st.booleans() | st.floats() | st.text(max_size=4) | st.none(),
    "hello_key": st.none() | st.just("") | st.integers() | st.lists(st.text(), max_size=2)
                 | st.text(min_size=1, max_size=20).filter(lambda k: k != KEY),
    "rate": st.integers(max_value=-1) | st.integers(min_value=10**9 + 1) | st.floats()
            | st.text(max_size=4),
    "lease_s": st.integers(max_value=0) | st.integers(min_value=86401) | st.floats()
               | st.text(max_size=4) | st.booleans(),
    "app_listeners": st.text(max_size=20) | bad_addresses | st.just([])
                     | st.just([APP] * 3) | st.integers(),
    "remote_listeners": st.text(max_size=20) | bad_addresses | st.just([]) | st.none(),
    "peer_fingerprint": st.text(max_size=70) | st.none() | st.just("0" * 64),
    "peer_certificate": st.text(max_size=70) | st.none() | st.integers(),
    "tls": st.text(max_size=3) | st.integers() | st.none() | st.lists(st.booleans(), max_size=1),
    "max_wait_seconds": st.sampled_from([math.nan, math.inf, -1.0, -math.inf]) | st.text()
                        | st.none() | st.booleans(),
    "poll_frequency_seconds": st.sampled_from([0, 0.0, -1, math.nan, math.inf]) | st.text()
                              | st.none(),
}


def valid_arguments(world: World) -> dict:
    """Valid arguments of each task (a fresh uid for reserve), the world's stream elsewhere."""
    fresh = str(uuid.uuid4())
    return {
        tasks.get_gateway_info: {"gateway": world.gateway},
        tasks.reserve_gateway_ports: {"gateway": world.gateway, "uid": fresh, "role": "CONS",
                                      "num_conn": 1, "hello_key": KEY, "rate": 0,
                                      "lease_s": 60},
        tasks.send_app_hello: {"gateway": world.gateway, "uid": world.uid, "hello_key": KEY,
                               "role": "PROD", "app_listeners": [APP]},
        tasks.wait_for_app_hello: {"gateway": world.gateway, "uid": world.uid,
                                   "max_wait_seconds": 1.0, "poll_frequency_seconds": 0.5},
        tasks.connect_gateway_proxy: {"gateway": world.gateway, "uid": world.uid,
                                      "remote_listeners": ["127.0.0.1:9"],
                                      "peer_fingerprint": world.reply["cert_fingerprint"],
                                      "peer_certificate": world.reply["certificate"],
                                      "tls": True},
        tasks.get_stream_status: {"gateway": world.gateway, "uid": world.uid},
        tasks.renew_stream_lease: {"gateway": world.gateway, "uid": world.uid, "lease_s": 3600},
        tasks.release_gateway_stream: {"gateway": world.gateway, "uid": world.uid},
    }


TASKS = sorted((getattr(tasks, name) for name in tasks.__all__), key=lambda t: t.name)


def test_every_task_is_covered(world):
    assert len(TASKS) == 8 and set(valid_arguments(world)) == set(TASKS)


@HYPOTHESIS
@given(data=st.data())
def test_a_task_refuses_a_bad_argument_and_changes_nothing(world, data):
    """One argument of a task is bad, the rest valid: a SciStream error (no retry of a
    refusal), and the gateway's state as it was."""
    world.ensure_stream()
    task = data.draw(st.sampled_from(TASKS), label="task")
    arguments = valid_arguments(world)[task]
    field = data.draw(st.sampled_from(sorted(arguments)), label="argument")
    bad = BAD[field]
    if task is tasks.reserve_gateway_ports and field == "hello_key":
        bad = bad.filter(lambda k: not isinstance(k, str) or not k)  # any key is a key
    arguments[field] = data.draw(bad, label=field)
    before = dump_state(world.state_dir)
    refused(lambda: task(**arguments))
    assert dump_state(world.state_dir) == before


def test_a_refusal_is_not_retried_but_an_outage_may_be(world):
    """The read-only tasks retry (twice, a second apart) only what may pass."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from scistream_gateway.errors import InvalidUid, Unavailable
    from scistream_prefect.tasks.streams import retry_if_transient

    assert retry_if_transient(None, None, Failed(data=Unavailable("state busy")))
    assert retry_if_transient(None, None, Failed(data=OSError("connection reset")))
    assert not retry_if_transient(None, None, Failed(data=InvalidUid("no such stream")))
    state = tasks.get_stream_status(world.gateway, str(uuid.uuid4()), return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        run = client.read_task_run(state.state_details.task_run_id)
    assert run.run_count == 1  # INVALID_UID: not retried
