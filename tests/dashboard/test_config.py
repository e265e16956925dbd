"""The ``baton_dashboard_*`` settings: defaults, the app's values, overrides, checks."""

from __future__ import annotations

import pytest
from celery import Celery

from baton_celery.dashboard.config import DashboardConfig


def test_defaults_bind_to_loopback_and_only_read(celery_app: Celery) -> None:
    config = DashboardConfig.from_app(celery_app)
    assert (config.host, config.port, config.allow_cancel) == ("127.0.0.1", 5566, False)
    assert config.token is None and config.basic_auth is None


def test_from_the_app_with_overrides(celery_app: Celery) -> None:
    celery_app.conf.update(
        baton_dashboard_port="8080",  # from an environment variable, say
        baton_dashboard_allow_cancel="off",
        baton_dashboard_heartbeat=5,
        baton_dashboard_prefix="/baton",
    )
    config = DashboardConfig.from_app(celery_app, port=None, host="0.0.0.0")
    assert (config.port, config.allow_cancel, config.heartbeat) == (8080, False, 5.0)
    assert (config.host, config.prefix) == ("0.0.0.0", "/baton")


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("port", "http", "baton_dashboard_port: cannot use 'http'"),
        ("port", 70000, "baton_dashboard_port: must be 0-65535"),
        ("prefix", "baton/", "baton_dashboard_prefix: must start with /"),
        ("page_size", 0, "baton_dashboard_page_size: must be 1-1000"),
        ("max_streams", 500, r"baton_dashboard_max_streams: must be 1 to threads - 2 \(78\)"),
        ("heartbeat", 0, "baton_dashboard_heartbeat: must be 0.05-300 seconds"),
    ],
)
def test_bad_settings_say_which(celery_app: Celery, key: str, value: object, why: str) -> None:
    celery_app.conf[f"baton_dashboard_{key}"] = value
    with pytest.raises(ValueError, match=why):
        DashboardConfig.from_app(celery_app)
