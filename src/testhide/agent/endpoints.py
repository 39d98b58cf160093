"""The control plane's replicas as an agent knows them, and the order in which
it tries them.

An agent is enrolled with one or more API endpoints (``--server``, repeatable)
and records the agent port of each replica. It talks to one replica at a time:
the one it last reached. When a connection cannot be made, the next attempt
goes to the next replica in the list at once; only after every replica has
failed in a row (a round) does the agent wait, with the capped, jittered
exponential backoff it always had, doubling per round. With one replica a
round is one attempt: the schedule of a single-server agent is unchanged. A
stream that breaks after it was established sends the agent to the next
replica first, since the one it was on has most likely gone away.

A single name that resolves to several addresses is one entry here: gRPC's
resolver returns every address, and its default ``pick_first`` policy tries
them in order on each new connection, also after the one in use went away
(checked with grpcio 1.85). Nothing is resolved by hand.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from testhide.common.tls import split_target

# tenacity's wait_random_exponential(multiplier=0.5), which the agent used per
# attempt before it knew of replicas: uniform(0, min(cap, 0.5 * 2 ** (n - 1))).
BACKOFF_MULTIPLIER_S = 0.5
_JITTER = random.SystemRandom()


def join_target(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 literal in brackets."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} of {host} is out of range")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def agent_endpoints(
    api_endpoints: Sequence[str], answered: str, advertised: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The agent port of every replica, in the order of ``api_endpoints``, and
    the API endpoints for which none can be derived (the port would be out of
    range: those need ``enroll --agent-server``).

    The enrollment answer (``advertised``) names the agent port of the replica
    that answered (``answered``): ``:PORT`` on the host the agent reached, or a
    full HOST:PORT. The other replicas are assumed to keep the same distance
    between their API and agent ports (``serve`` puts the agent port at the API
    port + 1 unless told otherwise); where they do not, the operator names the
    agent ports with ``enroll --agent-server``."""
    answered_host, answered_port = split_target(answered)
    if advertised.startswith(":"):
        if not advertised[1:].isdigit():
            raise ValueError(f"the control plane answered an invalid agent endpoint {advertised!r}")
        own = join_target(answered_host, int(advertised[1:]))
    else:
        split_target(advertised)
        own = advertised
    offset = split_target(own)[1] - answered_port
    found: list[str] = []
    underivable: list[str] = []
    for api in api_endpoints:
        if api == answered:
            found.append(own)
            continue
        host, port = split_target(api)
        try:
            found.append(join_target(host, port + offset))
        except ValueError:
            underivable.append(api)
    return tuple(dict.fromkeys(found)), tuple(underivable)


class Endpoints:
    """The replicas' agent endpoints, and the one to try first: the one last
    reached (at the start, the first listed)."""

    def __init__(self, targets: Sequence[str]) -> None:
        if not targets:
            raise ValueError("no control plane endpoints")
        self.targets = tuple(targets)
        self._preferred = 0

    @property
    def preferred(self) -> str:
        return self.targets[self._preferred]

    def reached(self, target: str) -> None:
        """``target`` answered: later series of attempts start there."""
        if target in self.targets:
            self._preferred = self.targets.index(target)

    def left(self, target: str) -> None:
        """The connection to ``target`` broke: later series of attempts start at the next replica."""
        if self.preferred == target:
            self._preferred = (self._preferred + 1) % len(self.targets)

    def attempts(self) -> Rotation:
        """A new series of attempts, starting at the preferred replica."""
        return Rotation(self.targets, self._preferred)


class Rotation:
    """One series of connection attempts, round the list from where it starts."""

    def __init__(self, targets: Sequence[str], start: int = 0) -> None:
        self._targets = tuple(targets)
        self._start = start
        self._failures = 0

    @property
    def target(self) -> str:
        """Where the next attempt goes."""
        return self._targets[(self._start + self._failures) % len(self._targets)]

    def failed(self) -> None:
        """The attempt at ``target`` failed: the next one goes to the next replica."""
        self._failures += 1

    @property
    def rounds_failed(self) -> int:
        """How many times every replica has failed in a row."""
        return self._failures // len(self._targets)

    def wait_s(self, cap_s: float, rng: random.Random | None = None) -> float:
        """How long to wait before the next attempt: nothing while this round
        has replicas left to try; after a full round, a jittered exponential
        backoff in the number of rounds, capped at ``cap_s``."""
        if self._failures == 0 or self._failures % len(self._targets):
            return 0.0
        ceiling = min(cap_s, BACKOFF_MULTIPLIER_S * 2 ** min(self.rounds_failed - 1, 32))
        return (rng or _JITTER).uniform(0, ceiling)
