"""Optional authentication from the dashboard's settings: a bearer token, HTTP basic
auth, or both (either is accepted). With neither set, every request is let through:
the server binds to 127.0.0.1 unless told otherwise, and a host app mounting the
blueprint may guard it its own way.

A browser cannot send a bearer token by itself: open ``/?token=...`` once, and the
dashboard keeps the token's fingerprint in an HttpOnly, SameSite=Strict cookie (the
query string is dropped by a redirect), which its live streams send along.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .config import DashboardConfig

__all__ = ["COOKIE", "Verdict", "check", "cookie_value"]

#: The cookie holding a bearer token's fingerprint, once given in ``?token=``.
COOKIE = "baton_dashboard"


def cookie_value(token: str) -> str:
    """What the cookie holds: not the token itself, a keyed hash of it."""
    return hmac.new(token.encode(), b"baton_dashboard cookie", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Verdict:
    """The result of :func:`check`: ``ok``, and for a refusal the challenge to send."""

    def __init__(self, ok: bool, challenge: str = "", set_cookie: bool = False) -> None:
        self.ok = ok
        self.challenge = challenge
        self.set_cookie = set_cookie  # a token came in ?token=: keep it in the cookie


def check(
    config: DashboardConfig,
    authorization: str | None,
    cookie: str | None,
    query_token: str | None,
) -> Verdict:
    """Whether a request may see the dashboard, from its ``Authorization`` header, the
    dashboard's cookie and a ``token`` in its query string."""
    token, basic = config.token, config.basic_auth
    if token is None and basic is None:
        return Verdict(True)
    scheme, _, credentials = (authorization or "").partition(" ")
    scheme = scheme.lower()
    if token is not None:
        if scheme == "bearer" and _same(credentials.strip(), token):
            return Verdict(True)
        if cookie is not None and _same(cookie, cookie_value(token)):
            return Verdict(True)
        if query_token is not None and _same(query_token, token):
            return Verdict(True, set_cookie=True)
    if basic is not None and scheme == "basic":
        try:
            given = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            given = ""
        if _same(given, basic):
            return Verdict(True)
    realm = 'realm="baton dashboard"'
    return Verdict(False, f"Basic {realm}" if basic is not None else f"Bearer {realm}")
