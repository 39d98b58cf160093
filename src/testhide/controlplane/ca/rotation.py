"""Rotating what the control plane presents and trusts, as file operations on
the data dir: a running ``serve`` notices within a second and applies them to
new connections, pushing new trust bundles to connected agents.

CA rotation in three stages, each safe on its own:
  prepare   a new CA generation is trusted (bundle = old + new) but signs nothing
  activate  the new CA signs agent renewals, enrollments and a new server certificate
  retire    only the new CA is trusted; certificates of the old one are refused
Between stages, wait at least one agent certificate lifetime, so that every
agent has the new bundle (prepare -> activate) and a new certificate (activate
-> retire). ``retire`` checks the second and refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509

from testhide.controlplane.atrest import MasterKey
from testhide.controlplane.ca.authority import CertificateAuthority
from testhide.controlplane.datadir import DataDir
from testhide.controlplane.errors import FailedPrecondition


@dataclass(frozen=True)
class CaState:
    active: int
    trusted: tuple[int, ...]


def ca_state(directory: DataDir) -> CaState:
    state = directory.require_initialised()
    return CaState(int(state["ca"]["active"]), tuple(int(g) for g in state["ca"]["trusted"]))


def _save(directory: DataDir, ca: CaState) -> None:
    with directory.sealing():
        state = directory.require_initialised()
        # Bundle first: a reader that sees the new state finds the bundle for it.
        directory.write_bundle(list(ca.trusted))
        state["ca"] = {"active": ca.active, "trusted": list(ca.trusted)}
        directory.write_state(state)


def rotate_server_certificate(
    directory: DataDir, master: MasterKey, names: Sequence[str] = ()
) -> x509.Certificate:
    """A new server certificate carrying ``names`` (every DNS name and address
    clients reach any replica by), which replace the names recorded at
    ``init`` or the last rotation; without ``names``, for the recorded ones."""
    state = directory.require_initialised()
    chosen = list(dict.fromkeys(names)) if names else list(state["server_names"])
    certificate = directory.issue_server_certificate(
        directory.load_ca(master, allow_development=True), chosen, master
    )
    if chosen != state["server_names"]:
        with directory.sealing():
            state = directory.require_initialised()
            state["server_names"] = chosen
            directory.write_state(state)
    return certificate


def prepare(directory: DataDir, master: MasterKey) -> int:
    current = ca_state(directory)
    if len(current.trusted) > 1:
        raise FailedPrecondition(
            "a CA rotation is already in progress "
            f"(trusted generations {list(current.trusted)}, active {current.active})"
        )
    state = directory.require_initialised()
    generation = max(current.trusted) + 1
    directory.store_ca(
        CertificateAuthority.create(str(state["trust_domain"]), generation), generation, master
    )
    _save(directory, CaState(current.active, (*current.trusted, generation)))
    return generation


def activate(directory: DataDir, master: MasterKey) -> int:
    current = ca_state(directory)
    newest = max(current.trusted)
    if newest == current.active:
        raise FailedPrecondition("no prepared CA to activate; run 'ca rotate prepare' first")
    _save(directory, CaState(newest, current.trusted))
    rotate_server_certificate(directory, master)
    return newest


def retiring(directory: DataDir) -> list[int]:
    current = ca_state(directory)
    return [g for g in current.trusted if g != current.active]


def retire(directory: DataDir) -> list[int]:
    current = ca_state(directory)
    old = retiring(directory)
    if not old:
        raise FailedPrecondition("nothing to retire: only the active CA is trusted")
    if current.active != max(current.trusted):
        raise FailedPrecondition("activate the new CA before retiring the old one")
    _save(directory, CaState(current.active, (current.active,)))
    return old
