"""Per-app configuration read from app.conf (baton_* keys), and the error-string bound."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import pytest
from celery import Celery

from baton_celery.config import Config, default_store_url
from baton_celery.runtime import Runtime


def make_app(main: str | None = "unit-config", **conf: Any) -> Celery:
    app = Celery(main, set_as_current=False)
    app.conf.update(broker_url="memory://", **conf)
    return app


def test_defaults_need_no_server() -> None:
    config = Config.from_app(make_app("unit-config-defaults"))
    assert config.store == default_store_url(make_app("unit-config-defaults"))
    assert config.store.startswith("sqlite:///")
    assert config.store_timeout == 5.0
    assert config.retention == 86400.0
    assert config.snooze_delay == 1.0
    assert config.max_error_length == 2000
    assert config.store_results is True


def test_default_store_is_a_sqlite_file_in_the_temp_dir_named_after_the_app() -> None:
    url = default_store_url(make_app("proj"))
    path = url[len("sqlite:///") :]
    assert os.path.isabs(path)
    assert os.path.dirname(path) == tempfile.gettempdir()
    assert os.path.basename(path) == "baton_celery-proj.sqlite3"


@pytest.mark.parametrize(
    ("main", "expected"),
    [
        ("my proj/with:odd*chars", "baton_celery-my_proj_with_odd_chars.sqlite3"),
        ("../../etc/passwd", "baton_celery-.._.._etc_passwd.sqlite3"),
        (None, "baton_celery-default.sqlite3"),
    ],
)
def test_default_store_name_is_sanitised(main: str | None, expected: str) -> None:
    url = default_store_url(make_app(main))
    path = url[len("sqlite:///") :]
    assert os.path.dirname(path) == tempfile.gettempdir()
    assert os.path.basename(path) == expected


def test_two_apps_get_different_default_stores() -> None:
    assert default_store_url(make_app("one")) != default_store_url(make_app("two"))


def test_every_key_is_read_from_app_conf() -> None:
    app = make_app(
        baton_store="memory://",
        baton_store_timeout=0.5,
        baton_retention=60,
        baton_snooze_delay=0.25,
        baton_max_error_length=100,
        baton_store_results=False,
    )
    assert Config.from_app(app) == Config(
        store="memory://",
        store_timeout=0.5,
        retention=60.0,
        snooze_delay=0.25,
        max_error_length=100,
        store_results=False,
    )


def test_values_are_coerced_from_strings() -> None:
    app = make_app(baton_store_timeout="2.5", baton_snooze_delay="3", baton_max_error_length="50")
    config = Config.from_app(app)
    assert config.store_timeout == 2.5
    assert config.snooze_delay == 3.0
    assert config.max_error_length == 50


def test_none_means_default() -> None:
    app = make_app(baton_store=None, baton_snooze_delay=None, baton_store_results=None)
    config = Config.from_app(app)
    assert config.store == default_store_url(app)
    assert config.snooze_delay == 1.0
    assert config.store_results is True


def test_boolean_settings_read_false_from_strings() -> None:
    """Settings often come from environment variables: "false" must mean False for every
    boolean setting (baton_store_results too), as it does for baton_bridge."""
    for text in ("false", "False", "0", "no", "off"):
        config = Config.from_app(make_app(baton_store_results=text, baton_bridge=text))
        assert (text, config.bridge) == (text, False)
        assert (text, config.store_results) == (text, False)


@pytest.mark.parametrize("text", ["true", "1", "yes", "on"])
def test_boolean_settings_read_true_from_strings(text: str) -> None:
    config = Config.from_app(make_app(baton_store_results=text, baton_bridge=text))
    assert config.bridge is True
    assert config.store_results is True


def test_config_is_frozen() -> None:
    config = Config.from_app(make_app(baton_store="memory://"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.store = "sqlite:///x"  # type: ignore[misc]


@pytest.mark.parametrize("length", [0, 5, 19])
def test_a_too_small_error_bound_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="baton_max_error_length"):
        Config.from_app(make_app(baton_max_error_length=length))


def test_bad_values_raise() -> None:
    with pytest.raises(ValueError):
        Config.from_app(make_app(baton_snooze_delay="soon"))


# --- the error-string bound (Runtime.error_text) ------------------------------------


def runtime(**conf: Any) -> Runtime:
    app = make_app(baton_store="memory://", **conf)
    return Runtime(app, Config.from_app(app))


def test_error_text_formats_an_exception() -> None:
    assert runtime().error_text(ValueError("boom")) == "ValueError: boom"
    assert runtime().error_text("plain text") == "plain text"
    assert runtime().error_text(None) is None


def test_error_text_escapes_lone_surrogates_so_any_store_can_keep_it() -> None:
    # A file name decoded with surrogateescape, in an OSError's text.
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    text = runtime().error_text(FileNotFoundError(f"no such file: {name}"))
    assert text == "FileNotFoundError: no such file: report-\\udcff.csv"
    assert text is not None and text.encode()


@pytest.mark.parametrize("limit", [20, 50, 2000])
def test_error_text_is_bounded(limit: int) -> None:
    rt = runtime(baton_max_error_length=limit)
    long = rt.error_text(RuntimeError("x" * 10_000))
    assert long is not None
    assert len(long) <= limit
    assert long.startswith("RuntimeError: x"[: limit - 14])
    assert long.endswith("[truncated]")
    assert len(long) >= limit - 1  # cut at the bound, not far before it
    exact = "y" * limit
    assert rt.error_text(exact) == exact  # at the bound: unchanged


def test_runtime_builds_its_store_from_the_url_once() -> None:
    rt = runtime()
    store = rt.store
    assert store is rt.store
    assert not store.shared_across_processes


def test_a_store_object_in_the_config_is_used_as_is() -> None:
    from baton_celery.stores import store_from_url

    given = store_from_url("memory://")
    app = make_app(baton_store=given)
    rt = Runtime(app, Config.from_app(app))
    assert rt.store is given
