"""LocalPair, the harness of two local gateways: its example, its leftovers report and
what leaving it releases and stops."""

from __future__ import annotations

import re

import pytest

from conftest import make_gateway
from scistream_gateway.errors import NoResource
from scistream_prefect import LocalPair


def test_the_docstring_example_runs_and_leaving_stops_the_workers(tmp_path, gateway_root):
    code = re.search(r"```python\n(.*?)```", LocalPair.__doc__, re.S).group(1)
    code = "\n".join(line[8:] for line in code.splitlines())
    namespace: dict = {}
    exec(compile(code.replace('"/tmp/', f'"{gateway_root}/'), "<LocalPair example>", "exec"),
         namespace)
    pair = namespace["pair"]
    assert pair.producer.settings.name == "lab-producer-gw"
    assert pair.producer.settings.port_max + 1 == pair.consumer.settings.port_min
    assert pair.producer.worker_pids() == pair.consumer.worker_pids() == []


def test_leftovers_name_what_a_stream_holds_and_leaving_releases_it(gateway_root):
    with LocalPair(make_gateway(gateway_root, "prod-gw"),
                   make_gateway(gateway_root, "cons-gw")) as pair:
        stream = pair.reserve(2)
        left = pair.leftovers()
        assert left.active_streams == 2  # one per gateway
        assert sorted(left.ports) == sorted(stream.prod["listeners"] + stream.cons["listeners"])
        assert len(left.stream_dirs) == 2 and all(stream.uid in d for d in left.stream_dirs)
        assert left.processes  # the native relays hold the ports
        workers = pair.producer.worker_pids()
        assert workers
    assert pair.producer.worker_pids() == []
    assert not pair.leftovers(), pair.leftovers()


def test_a_failed_reserve_releases_the_end_that_succeeded(gateway_root):
    with LocalPair(make_gateway(gateway_root, "roomy-gw"),
                   make_gateway(gateway_root, "tiny-gw", size=1)) as pair:
        with pytest.raises(NoResource):
            pair.reserve(2)
        assert not pair.leftovers()
