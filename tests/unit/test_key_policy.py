"""The organisation's limit on admin keys' lifetimes and the scope rules of `operations.access`,
without a store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from testhide.controlplane.errors import InvalidArgument, PermissionDenied
from testhide.controlplane.operations.access import check_key_lifetime, granted_scopes, lifetime_text
from testhide.controlplane.store.base import OrgRecord

NOW = datetime(2030, 1, 2, tzinfo=UTC)
DEFAULT = OrgRecord("acme", NOW)


@pytest.mark.parametrize("scopes", [("agents:admin",), ("org:admin", "jobs:read")])
@pytest.mark.parametrize("expires_in", [None, timedelta(days=90, seconds=1), timedelta(days=365)])
def test_an_admin_key_without_or_beyond_the_limit_is_refused(
    scopes: tuple[str, ...], expires_in: timedelta | None
) -> None:
    with pytest.raises(InvalidArgument) as error:
        check_key_lifetime(DEFAULT, scopes, expires_in)
    message = str(error.value)
    assert "at most 90d" in message
    assert "--expires-in 90d or less" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("org", "scopes", "expires_in"),
    [
        (DEFAULT, ("org:admin",), timedelta(days=90)),
        (DEFAULT, ("agents:admin",), timedelta(minutes=5)),
        (DEFAULT, ("jobs:read", "jobs:write", "secrets:write"), None),  # not an admin key
        (OrgRecord("acme", NOW, admin_key_max_lifetime=None), ("org:admin",), None),  # no limit
        (
            OrgRecord("acme", NOW, admin_key_max_lifetime=timedelta(days=400)),
            ("org:admin",),
            timedelta(days=365),
        ),
    ],
)
def test_keys_within_the_policy_are_accepted(
    org: OrgRecord, scopes: tuple[str, ...], expires_in: timedelta | None
) -> None:
    check_key_lifetime(org, scopes, expires_in)


def test_a_grantor_grants_only_scopes_it_holds() -> None:
    holder = frozenset({"org:admin", "jobs:read"})
    assert granted_scopes(["jobs:read", "jobs:read"], holder) == ("jobs:read",)
    with pytest.raises(PermissionDenied, match=r"\Acannot grant a scope you do not hold: agents:admin\Z"):
        granted_scopes(["jobs:read", "agents:admin"], holder)
    with pytest.raises(PermissionDenied, match="jobs:write"):
        granted_scopes([], holder)  # the default scopes are granted too
    assert granted_scopes([], None) == ("jobs:read", "jobs:write")  # the operator: no grantor
    with pytest.raises(InvalidArgument, match="unknown scope"):
        granted_scopes(["root"], None)


def test_lifetimes_are_shown_as_the_options_take_them() -> None:
    assert lifetime_text(timedelta(days=90)) == "90d"
    assert lifetime_text(timedelta(hours=36)) == "36h"
    assert lifetime_text(timedelta(minutes=90)) == "1h30m"
