"""Authentication from the settings: off by default; a bearer token (header, or once in
the query string, then a cookie); HTTP basic auth; both at once."""

from __future__ import annotations

import base64
from typing import Callable

import pytest

from baton_celery.dashboard import auth
from baton_celery.dashboard.config import DashboardConfig

from .conftest import Site

TOKEN = "s3cret-token-value"
PATHS = ["/", "/api/workflows", "/api/stream", "/static/common.js"]


def basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def status(site: Site, path: str, **kwargs: object) -> int:
    response = site.client.get(path, **kwargs)  # type: ignore[arg-type]
    response.close()  # a stream's response is open until closed
    return response.status_code


def test_off_by_default(site: Site) -> None:
    assert [status(site, p) for p in PATHS] == [200] * len(PATHS)


def test_a_token(make_site: Callable[..., Site]) -> None:
    site = make_site(token=TOKEN)
    for path in PATHS:
        refused = site.client.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="baton dashboard"'
    assert status(site, "/api/workflows", headers={"Authorization": "Bearer wrong-token"}) == 401
    assert status(site, "/api/workflows", headers={"Authorization": f"Bearer {TOKEN}"}) == 200
    assert status(site, "/api/stream", headers={"Authorization": f"Bearer {TOKEN}"}) == 200


def test_a_token_in_the_address_becomes_a_cookie(make_site: Callable[..., Site]) -> None:
    site = make_site(token=TOKEN)
    assert status(site, "/?token=nope") == 401
    first = site.client.get(f"/?state=running&token={TOKEN}")
    assert first.status_code == 303
    assert first.headers["Location"] == "/?state=running"  # the token leaves the address
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith(f"{auth.COOKIE}={auth.cookie_value(TOKEN)};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    # The test client keeps the cookie, as a browser does: pages and streams now open.
    assert [status(site, p) for p in PATHS] == [200] * len(PATHS)


def test_basic_auth(make_site: Callable[..., Site]) -> None:
    site = make_site(basic_auth="ops:pa:ss")
    refused = site.client.get("/")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'Basic realm="baton dashboard"'
    assert status(site, "/", headers=basic("ops:wrong")) == 401
    assert status(site, "/", headers={"Authorization": "Basic %%%"}) == 401
    assert status(site, "/", headers=basic("ops:pa:ss")) == 200
    assert status(site, "/api/stream", headers=basic("ops:pa:ss")) == 200


def test_either_when_both_are_set(make_site: Callable[..., Site]) -> None:
    site = make_site(token=TOKEN, basic_auth="ops:pass")
    assert status(site, "/", headers=basic("ops:pass")) == 200
    assert status(site, "/", headers={"Authorization": f"Bearer {TOKEN}"}) == 200
    assert site.client.get("/").headers["WWW-Authenticate"].startswith("Basic ")


def test_auth_comes_before_everything_else(make_site: Callable[..., Site]) -> None:
    site = make_site(token=TOKEN, allow_cancel=True)
    wf = site.workflow({"a": []})
    for path in [f"/workflows/{wf}", "/workflows/unknown", "/?state=bad"]:
        assert status(site, path) == 401, path
    cancel = site.client.post(
        f"/api/workflows/{wf}/cancel", headers={"X-Baton-Dashboard": "cancel"}
    )
    assert cancel.status_code == 401
    assert site.store.load(wf).outcome is None


@pytest.mark.parametrize(
    "settings, why",
    [
        ({"token": "short"}, "baton_dashboard_token: must be at least 8 characters"),
        ({"basic_auth": "no-colon"}, "baton_dashboard_basic_auth: must be 'user:password'"),
    ],
)
def test_weak_settings_are_refused(settings: dict[str, str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        DashboardConfig(**settings).checked()  # type: ignore[arg-type]
