"""Who may do what over HTTP.

* **Changes** (every ``POST``) need ``Authorization: Bearer <PROVISIONER_API_TOKEN>``. A missing or
  wrong token is a 401; with no token configured on the server every change is refused with a 403
  (``changes_disabled``): the API never changes anything anonymously.
* **Reads** (``GET``: the JSON reads, the pages, ``/metrics``) are open to a client whose address
  is loopback (``127.0.0.0/8``, ``::1``, ``::ffff:127.x.y.z``): the operator on the machine, or
  through an SSH tunnel. Any other client must present the token as well: the header, or the
  ``provisioner_token`` cookie that the pages set when the operator pastes the token. The cookie
  is honoured for reads only, so a page of another site cannot make a browser send a change.
* "The client address" is the TCP peer, as uvicorn reports it: uvicorn replaces it with the
  ``X-Forwarded-For`` address only when the peer is a trusted proxy (``--forwarded-allow-ips``,
  by default 127.0.0.1). A reverse proxy on the same machine that does not send that header makes
  every client look local: give it the token to send, or let it set the header.

Tokens are compared with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import unquote

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

TOKEN_COOKIE = "provisioner_token"  # noqa: S105 (a cookie name)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`PROVISIONER_API_TOKEN`. Required for every change; for reads only when the "
    "client is not on loopback.",
)


class AccessDenied(Exception):
    def __init__(self, status_code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.reason = reason
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        if self.status_code != 401:
            return {}
        return {"WWW-Authenticate": 'Bearer realm="provisioner"'}


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def token_matches(presented: str | None, expected: SecretStr | None) -> bool:
    if not presented or expected is None:
        return False
    return hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())


def _expected(request: Request) -> SecretStr | None:
    token: SecretStr | None = request.app.state.settings.api_token
    return token


def require_change_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
) -> None:
    """Every change: the bearer token, which must be configured."""
    expected = _expected(request)
    if expected is None:
        raise AccessDenied(
            403,
            "changes_disabled",
            "changes through the HTTP API are disabled: PROVISIONER_API_TOKEN is not set on the "
            "server (the CLI and the command bus still work)",
        )
    if credentials is None:
        raise AccessDenied(
            401,
            "unauthorized",
            "this change needs the API token: send 'Authorization: Bearer <PROVISIONER_API_TOKEN>'",
        )
    if not token_matches(credentials.credentials, expected):
        raise AccessDenied(401, "unauthorized", "the bearer token is not PROVISIONER_API_TOKEN")


def allow_read(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
) -> None:
    """Every read: open on loopback, otherwise the token (header or the pages' cookie)."""
    if is_loopback(request.client.host if request.client else None):
        return
    expected = _expected(request)
    if expected is None:
        raise AccessDenied(
            403,
            "unauthorized",
            "reads are open to loopback clients only, and no PROVISIONER_API_TOKEN is set that "
            "would let other hosts read: set it, or connect from the machine (an SSH tunnel)",
        )
    cookie = request.cookies.get(TOKEN_COOKIE)
    presented = credentials.credentials if credentials else unquote(cookie) if cookie else None
    if presented is None:
        raise AccessDenied(
            401,
            "unauthorized",
            "reads from other hosts need the API token: send 'Authorization: Bearer "
            "<PROVISIONER_API_TOKEN>' (or paste it into the page)",
        )
    if not token_matches(presented, expected):
        raise AccessDenied(401, "unauthorized", "the bearer token is not PROVISIONER_API_TOKEN")
