"""The block types, for Prefect: its ``prefect.collections`` entry point imports this
module when Prefect starts, so a block type is found by its slug
(``Block.load("scistream-local-gateway/...")``) whether or not ``scistream_prefect``
was imported before Prefect was."""

from scistream_prefect.auth import GlobusCredentials
from scistream_prefect.compute import GlobusComputeGateway
from scistream_prefect.gateways import LocalGateway

__all__ = ["GlobusComputeGateway", "GlobusCredentials", "LocalGateway"]
