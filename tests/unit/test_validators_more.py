"""Property tests for the validators added with jobs and sessions."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from testhide.controlplane.auth.passwords import check_complexity
from testhide.controlplane.errors import InvalidArgument
from testhide.controlplane.jobs.validation import SECRET_NAME_RE, validate_relative_path

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@SETTINGS
@given(st.text(max_size=300))
def test_relative_paths_never_escape(path: str) -> None:
    try:
        validate_relative_path("p", path)
    except InvalidArgument:
        return
    assert not path.startswith("/")
    assert ".." not in path.split("/")
    assert "\x00" not in path
    assert path


@SETTINGS
@given(st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,20}\Z"))
def test_secret_names_like_env_vars_are_accepted(name: str) -> None:
    assert SECRET_NAME_RE.match(name)


@SETTINGS
@given(st.text(alphabet=string.ascii_lowercase + "-.", min_size=1, max_size=30))
def test_lowercase_secret_names_are_refused(name: str) -> None:
    assert not SECRET_NAME_RE.match(name)


@SETTINGS
@given(st.text(max_size=100), st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=10))
def test_accepted_passwords_meet_every_rule(password: str, user: str) -> None:
    try:
        check_complexity(password, user)
    except InvalidArgument:
        return
    assert len(password) >= 12
    assert len(password.encode()) <= 72
    assert user not in password.lower()
    classes = [
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]
    assert sum(classes) >= 3
