"""Who may call the API, administered: organisations and their API-key policy (the
operator's alone), and within one organisation its API keys, users and the secrets
listing (``org:admin``). Each operation is a store call and an audit entry.

An organisation is the boundary: a key or user of another one is `NotFound`, in the same
words as one that does not exist. Over the API the caller may grant only scopes it holds
itself (``grantor``), so ``org:admin`` cannot mint ``agents:admin``; the operator, with a
shell on the control-plane host, passes ``grantor=None``. API keys are machine
credentials that live until revoked, so each organisation bounds how long one holding an
admin scope may live (`OrgRecord.admin_key_max_lifetime`, 90 days unless the operator
sets another limit or none)."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta

from testhide.common.durations import format_duration
from testhide.common.identity import NAME_RE as ORG_NAME_RE
from testhide.controlplane.auth.passwords import check_complexity, hash_password
from testhide.controlplane.auth.principal import SCOPES
from testhide.controlplane.auth.secrets import hash_secret, new_api_key
from testhide.controlplane.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    quoted,
)
from testhide.controlplane.jobs.model import SecretInfo
from testhide.controlplane.jobs.validation import validate_name
from testhide.controlplane.operations import Actor
from testhide.controlplane.store.base import ApiKeyRecord, OrgRecord, UserRecord

DEFAULT_SCOPES = ("jobs:read", "jobs:write")
ADMIN_SCOPES = frozenset({"agents:admin", "org:admin"})
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
NAME_RULE = "1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
_KEY_ID_RE = re.compile(r"\A[0-9a-f]{16}\Z")
MAX_KEY_LIFETIME = timedelta(days=3650)
Hasher = Callable[[str], Awaitable[bytes]]


def lifetime_text(value: timedelta) -> str:
    """``90d`` rather than ``2160h``: what ``--expires-in`` and ``--admin-key-max-lifetime`` take."""
    seconds = int(value.total_seconds())
    return f"{seconds // 86400}d" if seconds and seconds % 86400 == 0 else format_duration(value)


def api_key_state(key: ApiKeyRecord, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    return "expired" if key.expires_at is not None and key.expires_at <= now else "active"


def user_state(user: UserRecord) -> str:
    return "revoked" if user.revoked_at is not None else "active"


def granted_scopes(requested: Iterable[str], grantor: frozenset[str] | None) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(requested)) or DEFAULT_SCOPES
    for scope in scopes:
        if scope not in SCOPES:
            raise InvalidArgument(f"unknown scope {quoted(scope)}; one of: {', '.join(SCOPES)}")
    for scope in scopes:
        if grantor is not None and scope not in grantor:
            raise PermissionDenied(f"cannot grant a scope you do not hold: {scope}")
    return scopes


def _name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(f"{kind} name {quoted(name)}: {NAME_RULE}")
    return name


async def _org(actor: Actor, org: str) -> OrgRecord:
    found = await actor.store.get_org(org)
    if found is None:
        shown = org if ORG_NAME_RE.match(org) else "ORG"
        raise NotFound(
            f"no organisation {quoted(org)}; create it first: testhide-controlplane orgs create {shown}"
        )
    return found


def check_key_lifetime(org: OrgRecord, scopes: tuple[str, ...], expires_in: timedelta | None) -> None:
    """The organisation's limit on keys with an admin scope; keys without one may live forever."""
    limit = org.admin_key_max_lifetime
    admin = sorted(ADMIN_SCOPES.intersection(scopes))
    if limit is None or not admin:
        return
    if expires_in is None or expires_in > limit:
        most = lifetime_text(limit)
        raise InvalidArgument(
            f"organisation {org.name} allows API keys with {' or '.join(admin)} to live at most {most}:"
            f" give this one an expiry (--expires-in {most} or less)"
        )


# API keys ---------------------------------------------------------------------------------------------------


async def create_api_key(
    actor: Actor,
    org: str,
    name: str,
    scopes: Iterable[str],
    expires_in: timedelta | None,
    grantor: frozenset[str] | None,
) -> tuple[str, ApiKeyRecord]:
    """The key (shown this once; only its hash is stored) and its record."""
    _name("API key", name)
    granted = granted_scopes(scopes, grantor)
    if expires_in is not None and not timedelta(seconds=1) <= expires_in <= MAX_KEY_LIFETIME:
        raise InvalidArgument(f"an API key's expiry must be from 1s to {lifetime_text(MAX_KEY_LIFETIME)}")
    check_key_lifetime(await _org(actor, org), granted, expires_in)
    text, parsed = new_api_key()
    now = datetime.now(UTC)
    record = ApiKeyRecord(
        parsed.key_id,
        org,
        name,
        hash_secret(parsed.secret),
        granted,
        now,
        owner=f"service-account:{name}",
        expires_at=now + expires_in if expires_in is not None else None,
    )
    await actor.store.create_api_key(record)
    await _audit(
        actor,
        "api_key_created",
        org,
        record.id,
        name=name,
        scopes=list(granted),
        expires_at=record.expires_at.isoformat() if record.expires_at else None,
    )
    return text, record


async def list_api_keys(actor: Actor, org: str) -> list[ApiKeyRecord]:
    keys = await actor.store.list_api_keys(org)
    await _audit(actor, "api_keys_listed", org, org)
    return keys


async def revoke_api_key(actor: Actor, org: str, key_id: str) -> ApiKeyRecord:
    """By id or by its ``thk_ID`` prefix; the sessions it opened end too."""
    key_id = key_id.removeprefix("thk_").split("_")[0]
    revoked = (
        await actor.store.revoke_api_key(org, key_id, datetime.now(UTC)) if _KEY_ID_RE.match(key_id) else None
    )
    if revoked is None:
        raise NotFound(f"no API key {quoted(key_id)} in this organisation")
    await _audit(actor, "api_key_revoked", org, key_id)
    return revoked


# users ------------------------------------------------------------------------------------------------------


async def _hash_off_the_loop(password: str) -> bytes:
    return await asyncio.to_thread(hash_password, password)


async def create_user(
    actor: Actor,
    org: str,
    name: str,
    scopes: Iterable[str],
    password: str,
    grantor: frozenset[str] | None,
    hasher: Hasher = _hash_off_the_loop,
) -> UserRecord:
    _name("user", name)
    granted = granted_scopes(scopes, grantor)
    check_complexity(password, name)
    await _org(actor, org)
    if await actor.store.find_user(org, name) is not None:
        raise FailedPrecondition(f"user {name} already exists in this organisation")
    record = UserRecord(
        "u" + secrets.token_hex(8), org, name, await hasher(password), granted, datetime.now(UTC)
    )
    await actor.store.create_user(record)
    await _audit(actor, "user_created", org, name, scopes=list(granted))
    return record


async def list_users(actor: Actor, org: str) -> list[tuple[UserRecord, bool]]:
    """Each user, and whether it has a confirmed second factor."""
    users = await actor.store.list_users(org)
    mfa = [await actor.store.mfa_factor(org, u.id, confirmed=True) is not None for u in users]
    await _audit(actor, "users_listed", org, org)
    return list(zip(users, mfa, strict=True))


async def revoke_user(actor: Actor, org: str, name: str) -> UserRecord:
    """The user's sessions end too."""
    revoked = await actor.store.revoke_user(org, name, datetime.now(UTC)) if NAME_RE.match(name) else None
    if revoked is None:
        raise NotFound(f"no user {quoted(name)} in this organisation")
    await _audit(actor, "user_revoked", org, name)
    return revoked


# secrets ----------------------------------------------------------------------------------------------------


async def list_secrets(actor: Actor, org: str) -> list[SecretInfo]:
    """Names and when each was last handed to a job; never a value."""
    found = await actor.store.list_secrets(org)
    await _audit(actor, "secrets_listed", org, org)
    return found


# organisations (the operator's) -----------------------------------------------------------------------------


async def create_org(actor: Actor, org: str) -> OrgRecord:
    """With a pool named default."""
    validate_name("org", org)
    now = datetime.now(UTC)
    await actor.store.create_org(org, now)
    await actor.store.create_pool(org, "default", now)
    await _audit(actor, "org_created", org, org)
    return await _org(actor, org)


async def revoke_org(actor: Actor, org: str) -> dict[str, int]:
    """Its API keys, users, sessions, agents and enrollment tokens are revoked; its data stays."""
    counts = await actor.store.revoke_org(org, datetime.now(UTC))
    if counts is None:
        raise NotFound(f"no organisation {quoted(org)}")
    await _audit(actor, "org_revoked", org, org, revoked=counts)
    return counts


async def list_orgs(actor: Actor) -> list[OrgRecord]:
    return await actor.store.list_org_records()


async def set_admin_key_max_lifetime(actor: Actor, org: str, lifetime: timedelta | None) -> OrgRecord:
    """``None``: no limit. Keys that exist are not touched."""
    if lifetime is not None and not timedelta(seconds=1) <= lifetime <= MAX_KEY_LIFETIME:
        raise InvalidArgument(f"the limit must be from 1s to {lifetime_text(MAX_KEY_LIFETIME)}, or none")
    updated = await actor.store.set_admin_key_max_lifetime(org, lifetime)
    if updated is None:
        raise NotFound(f"no organisation {quoted(org)}")
    await _audit(
        actor,
        "org_policy_set",
        org,
        org,
        admin_key_max_lifetime_s=None if lifetime is None else int(lifetime.total_seconds()),
    )
    return updated


async def _audit(actor: Actor, action: str, org: str, target: str, **details: object) -> None:
    await actor.auditor.record(
        action, actor.name, org=org, target=target, source_ip=actor.source_ip, **details
    )
