"""Globus Auth for the client: interactive login for people, a confidential client for runs.

People run ``scistream login`` once. Its native-app client id is a setting,
``SCISTREAM_LOGIN_CLIENT_ID``, whose default is Globus Compute's public native client: with
it the login *is* the Globus Compute SDK's login (the same client, the same token store,
``$GLOBUS_COMPUTE_USER_DIR/storage.db``, by default ``~/.globus_compute/storage.db``), so one
``scistream login`` also serves ``scistream-gateway register`` and any Compute SDK client
of the same user, and one ``globus-compute`` login serves ``scistream``. A facility that
registers its own native app (so the consent screen names it) sets that client id; its
tokens then live in globus-sdk's per-app file,
``~/.globus/app/<client id>/scistream/tokens.json`` (owner-only), since a refresh token
works only for the client it was issued to. Tokens never land in the working directory.

Headless runs (deployments, workers, CI) use a :class:`~globus_sdk.ClientApp`: the client
id and secret come from a saved :class:`GlobusCredentials` block or from
``SCISTREAM_GLOBUS_CLIENT_ID`` / ``SCISTREAM_GLOBUS_CLIENT_SECRET`` (else Globus Compute's
own ``GLOBUS_COMPUTE_CLIENT_ID`` / ``GLOBUS_COMPUTE_CLIENT_SECRET``), and their tokens stay
in memory.

Apps are made inside the process that uses them (see :func:`make_app`), never passed
between tasks. A missing or expired login is :class:`~scistream_gateway.errors.AuthError`
with what to do about it, never an interactive prompt in the middle of a flow.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from scistream_gateway.errors import AuthError

__all__ = [
    "APP_NAME",
    "DEFAULT_CLIENT_ID",
    "LOGIN_CLIENT_ID_ENV",
    "GlobusCredentials",
    "login",
    "logout",
    "login_client_id",
    "make_app",
    "token_file",
    "whoami",
]

APP_NAME = "scistream"
# Globus Compute's public native client (the Compute SDK's default): logging in with it
# shares one login with the Compute SDK, at the price of a consent screen naming Compute.
DEFAULT_CLIENT_ID = "4cf29807-cf21-49ec-9443-ff9a3fb9f81c"
LOGIN_CLIENT_ID_ENV = "SCISTREAM_LOGIN_CLIENT_ID"
# A confidential client: each pair is read whole, ours first.
CLIENT_ENV_PAIRS = (("SCISTREAM_GLOBUS_CLIENT_ID", "SCISTREAM_GLOBUS_CLIENT_SECRET"),
                    ("GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET"))


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
    _logo_url = "https://github.com/scistream.png"  # the SciStream organisation's avatar
    _documentation_url = "https://scistream.readthedocs.io/en/latest/"

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


def _compute_login_client_id() -> str:
    """The native client the Compute SDK logs people in with (its own rule)."""
    client_id = os.environ.get("GLOBUS_COMPUTE_CLIENT_ID")
    if client_id and not os.environ.get("GLOBUS_COMPUTE_CLIENT_SECRET"):
        return client_id
    return DEFAULT_CLIENT_ID


def login_client_id() -> str:
    """The native-app client id ``scistream login`` uses: ``SCISTREAM_LOGIN_CLIENT_ID``,
    else the Compute SDK's (``GLOBUS_COMPUTE_CLIENT_ID`` without a secret, else
    :data:`DEFAULT_CLIENT_ID`)."""
    return os.environ.get(LOGIN_CLIENT_ID_ENV) or _compute_login_client_id()


def _user_storage(client_id: str, config):
    """Where the user's tokens live: the Compute SDK's store when both use one client."""
    from globus_sdk.token_storage import JSONTokenStorage, SQLiteTokenStorage

    if client_id != _compute_login_client_id():
        return JSONTokenStorage.for_globus_app(client_id, APP_NAME, config, "DEFAULT")
    # globus-compute-sdk 4.19 exports no function for its token store
    # (globus_compute_sdk.sdk.auth.token_storage is outside its public API), so its
    # on-disk layout is named here: <GLOBUS_COMPUTE_USER_DIR or ~/.globus_compute>/
    # storage.db, namespace user/<GLOBUS_SDK_ENVIRONMENT>.
    from globus_sdk.config import get_environment_name

    compute_dir = Path(os.environ.get("GLOBUS_COMPUTE_USER_DIR")
                       or Path.home() / ".globus_compute")
    compute_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = compute_dir / "storage.db"
    storage = SQLiteTokenStorage(path, namespace=f"user/{get_environment_name()}",
                                 connect_params={"check_same_thread": False})
    os.chmod(path, 0o600)  # SQLite creates it with umask's mode; the directory is 0700
    return storage


def _user_app(*, interactive: bool):
    from globus_sdk import GlobusAppConfig, UserApp

    client_id = login_client_id()
    config = GlobusAppConfig(
        request_refresh_tokens=True,
        # Inside a flow a missing login must fail with a message, not wait on stdin.
        **({} if interactive else {"token_validation_error_handler": None}),
    )
    config = dataclasses.replace(config, token_storage=_user_storage(client_id, config))
    return UserApp(APP_NAME, client_id=client_id, scope_requirements=_scope_requirements(),
                   config=config)


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
    for id_name, secret_name in CLIENT_ENV_PAIRS:
        client_id, secret = os.environ.get(id_name), os.environ.get(secret_name)
        if secret and client_id:
            return _client_app(client_id, secret)
        # GLOBUS_COMPUTE_CLIENT_ID alone names the Compute SDK's native client, not half
        # of a confidential one; ours alone is a mistake worth saying.
        if secret or (client_id and id_name.startswith("SCISTREAM")):
            raise AuthError(f"only one of {id_name} and {secret_name} is set: set both to run "
                            "as a confidential client, or neither to use your login (whose "
                            f"client id is {LOGIN_CLIENT_ID_ENV})")
    return _user_app(interactive=interactive)


def token_file() -> str:
    """Where ``scistream login`` keeps the user's tokens."""
    from globus_sdk import GlobusAppConfig

    storage = _user_storage(login_client_id(), GlobusAppConfig())
    storage.close()
    return str(storage.filepath)


def login(*, force: bool = False, app=None) -> None:
    """Log in (the command-line flow: open a URL, paste the code back) unless tokens are valid."""
    app = app or make_app(interactive=True)
    app.login(force=force)


def logout(*, app=None) -> None:
    """Revoke the stored tokens with Globus Auth and delete them (with the default client,
    that is the Compute SDK's login too)."""
    app = app or _user_app(interactive=False)
    app.logout(sweep=True)


def whoami(*, app=None) -> dict:
    """The identity the client runs as: ``sub``, ``preferred_username``, ``name``, ``email``.

    Raises:
        AuthError: not logged in (or the login expired beyond refresh).
    """
    from globus_sdk import AuthClient, GlobusAPIError
    from globus_sdk.token_storage import TokenValidationError

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
