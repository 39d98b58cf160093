"""common/logging.py: credentials are redacted by exact key, and nothing else is."""

from __future__ import annotations

import json

import pytest
import structlog

from testhide.common.logging import SECRET_KEYS, configure, redact


@pytest.mark.parametrize("key", [*sorted(SECRET_KEYS), "Token", "API_KEY"])
def test_a_credential_field_is_redacted(key: str) -> None:
    assert redact(None, "info", {key: "s3cr3t"}) == {key: "[redacted]"}


@pytest.mark.parametrize("key", ["token_id", "secret_name", "api_key_id", "password_changed", "key_id"])
def test_a_field_that_only_names_a_credential_is_kept(key: str) -> None:
    assert redact(None, "info", {key: "visible"}) == {key: "visible"}


def test_the_configured_logger_redacts_on_the_way_out(capsys: pytest.CaptureFixture[str]) -> None:
    configure(json_output=True)
    # Nothing may stay cached with this configuration: later tests capture logs of their own.
    structlog.configure(cache_logger_on_first_use=False)
    try:
        structlog.get_logger("t").info("enrollment_token_refused", token_id="tok_1", token="th1.secret")
    finally:
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["token_id"] == "tok_1"
    assert line["token"] == "[redacted]"
