"""Globus Auth for the client: interactive login for people, a confidential client for runs.

People run ``scistream login`` once; globus-sdk's :class:`~globus_sdk.UserApp` keeps the
tokens (refresh tokens included) in its standard per-user file,
``~/.globus/app/<client id>/scistream/tokens.json`` (created owner-only), never in the
working directory. Headless runs (deployments, workers, CI) use a
:class:`~globus_sdk.ClientApp`: the client id and secret come from a saved
:class:`GlobusCredentials` block or from ``SCISTREAM_GLOBUS_CLIENT_ID`` /
``SCISTREAM_GLOBUS_CLIENT_SECRET`` (Globus Compute's own ``GLOBUS_COMPUTE_CLIENT_ID`` /
``GLOBUS_COMPUTE_CLIENT_SECRET`` are read too), and their tokens stay in memory.

Apps are made inside the process that uses them (see :func:`make_app`), never passed
between tasks. A missing or expired login is :class:`~scistream_gateway.errors.AuthError`
with what to do about it, never an interactive prompt in the middle of a flow.
"""

from __future__ import annotations

import os
import uuid

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from scistream_gateway.errors import AuthError

__all__ = [
    "APP_NAME",
    "DEFAULT_CLIENT_ID",
    "GlobusCredentials",
    "login",
    "logout",
    "make_app",
    "token_file",
    "whoami",
]

APP_NAME = "scistream"
# Globus Compute's public native client: its users have consented to the Compute scope
# with it, and it is registered for the command-line login flow.
DEFAULT_CLIENT_ID = "4cf29807-cf21-49ec-9443-ff9a3fb9f81c"
CLIENT_ID_ENV = ("SCISTREAM_GLOBUS_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_ID")
CLIENT_SECRET_ENV = ("SCISTREAM_GLOBUS_CLIENT_SECRET", "GLOBUS_COMPUTE_CLIENT_SECRET")


class GlobusCredentials(Block):
    """A Globus Auth confidential client (a service identity) for headless runs.

    A deployment or worker cannot open a browser, so it authenticates as a client
    registered at app.globus.org (Settings, Developers) with a client secret. Give a
    :class:`~scistream_prefect.compute.GlobusComputeGateway` the *name* of this block
    (``credentials_block=``): the secret is loaded where the gateway is called, so it is
    never a task or flow parameter.

    Example:
        Save once, then use by name:
        ```python
        from scistream_prefect import GlobusCredentials

        GlobusCredentials(client_id="…", client_secret="…").save("facility-robot")
        creds = GlobusCredentials.load("facility-robot")
        ```
    """

    _block_type_name = "SciStream Globus Credentials"
    _description = "A Globus Auth confidential client (id and secret) for headless runs."

    client_id: uuid.UUID = Field(
        description="Client id of a confidential client registered with Globus Auth.",
    )
    client_secret: SecretStr = Field(
        description="That client's secret; stored encrypted by Prefect, never logged.",
    )

    def make_app(self):
        """A :class:`globus_sdk.ClientApp` for this client (tokens kept in memory)."""
        return _client_app(str(self.client_id), self.client_secret.get_secret_value())


def _scope_requirements() -> dict[str, list[str]]:
    from globus_sdk import AuthClient, ComputeClientV3

    return {
        ComputeClientV3.scopes.resource_server: [str(ComputeClientV3.scopes.all)],
        AuthClient.scopes.resource_server: [
            str(AuthClient.scopes.openid), str(AuthClient.scopes.profile),
            str(AuthClient.scopes.email),
        ],
    }


def _client_app(client_id: str, client_secret: str):
    from globus_sdk import ClientApp, GlobusAppConfig

    return ClientApp(
        APP_NAME, client_id=client_id, client_secret=client_secret,
        scope_requirements=_scope_requirements(),
        # A client gets new tokens with its secret in one request; nothing to keep on disk.
        config=GlobusAppConfig(token_storage="memory"),
    )


def _user_app(client_id: str | None = None, *, interactive: bool):
    from globus_sdk import GlobusAppConfig, UserApp

    config = GlobusAppConfig(
        token_storage="json",  # ~/.globus/app/<client id>/scistream/tokens.json, owner-only
        request_refresh_tokens=True,
        # Inside a flow a missing login must fail with a message, not wait on stdin.
        **({} if interactive else {"token_validation_error_handler": None}),
    )
    return UserApp(APP_NAME, client_id=client_id or _env(CLIENT_ID_ENV) or DEFAULT_CLIENT_ID,
                   scope_requirements=_scope_requirements(), config=config)


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def make_app(credentials_block: str | None = None, *, interactive: bool = False):
    """The Globus app this process authenticates with.

    In order: the :class:`GlobusCredentials` block named ``credentials_block``; a
    confidential client from the environment (id and secret both set); the user's own
    login from ``scistream login``.

    Raises:
        AuthError: the block does not exist, or only half of a client's credentials
            are set in the environment.
    """
    if credentials_block is not None:
        try:
            block = GlobusCredentials.load(credentials_block)
        except ValueError as exc:
            raise AuthError(f"no GlobusCredentials block named {credentials_block!r}: "
                            f"{exc}") from None
        return block.make_app()
    client_id, secret = _env(CLIENT_ID_ENV), _env(CLIENT_SECRET_ENV)
    if secret and not client_id:
        raise AuthError(f"{CLIENT_SECRET_ENV[0]} is set but {CLIENT_ID_ENV[0]} is not: set "
                        "both to run as a confidential client, or neither to use your login")
    if secret:
        return _client_app(client_id, secret)
    return _user_app(client_id, interactive=interactive)


def token_file(client_id: str | None = None) -> str:
    """Where ``scistream login`` keeps the user's tokens."""
    app = _user_app(client_id, interactive=False)
    # The validating wrapper's inner storage is the JSON file ("json" in _user_app).
    return str(app.token_storage.token_storage.filepath)


def login(*, force: bool = False, app=None) -> None:
    """Log in (the command-line flow: open a URL, paste the code back) unless tokens are valid."""
    app = app or make_app(interactive=True)
    app.login(force=force)


def logout(*, app=None) -> None:
    """Revoke the stored tokens with Globus Auth and delete them."""
    app = app or _user_app(interactive=False)
    app.logout(sweep=True)


def whoami(*, app=None) -> dict:
    """The identity the client runs as: ``sub``, ``preferred_username``, ``name``, ``email``.

    Raises:
        AuthError: not logged in (or the login expired beyond refresh).
    """
    from globus_sdk import AuthClient, GlobusAPIError
    from globus_sdk.token_storage.validating_token_storage import TokenValidationError

    app = app or make_app()
    try:
        info = AuthClient(app=app).userinfo()
    except GlobusAPIError as exc:
        raise AuthError(f"Globus Auth refused the stored login ({exc.http_status}): run "
                        "`scistream login` again") from None
    except TokenValidationError:  # no tokens, expired beyond refresh, wrong scopes
        raise AuthError("not logged in: run `scistream login` (or configure a "
                        "GlobusCredentials block for headless runs)") from None
    return {key: info.get(key) for key in ("sub", "preferred_username", "name", "email")}
