"""Prefect tasks, one gateway call each."""

from scistream_prefect.tasks.gateway import get_gateway_info
from scistream_prefect.tasks.streams import (
    connect_gateway_proxy,
    get_stream_status,
    release_gateway_stream,
    renew_stream_lease,
    reserve_gateway_ports,
    send_app_hello,
    wait_for_app_hello,
)

__all__ = [
    "connect_gateway_proxy",
    "get_gateway_info",
    "get_stream_status",
    "release_gateway_stream",
    "renew_stream_lease",
    "reserve_gateway_ports",
    "send_app_hello",
    "wait_for_app_hello",
]
