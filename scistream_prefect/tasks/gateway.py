"""Tasks about a gateway as a whole."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from scistream_gateway.protocol import GatewayInfoReply
from scistream_prefect import streams_core as core
from scistream_prefect.gateways import Gateway
from scistream_prefect.tasks.streams import logged_call, retry_if_transient, run_name

__all__ = ["get_gateway_info"]


@task(name="get-gateway-info", task_run_name=run_name("info"), cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=1, retry_condition_fn=retry_if_transient)
def get_gateway_info(gateway: Gateway) -> GatewayInfoReply:
    """Name, version, backends, addresses, free ports and active streams of a gateway.

    Read-only, so retried on failure.

    Args:
        gateway: the gateway block.

    Returns:
        The gateway's reply: ``.name, .version, .backends, .lan_address,
        .wan_address, .port_range, .free_ports, .active_streams, .rate_in_use``, ...

    Example:
        ```python
        from prefect import flow
        from scistream_prefect import LocalGateway, get_gateway_info

        @flow
        def inspect_gateway():
            gw = LocalGateway.create("facility-p", "/tmp/facility-p")
            return get_gateway_info(gw).free_ports
        ```
    """
    with logged_call(gateway, "gateway_info", None):
        return core.gateway_info(gateway)
