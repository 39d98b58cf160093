"""Per job: an internal Docker network whose only other member is the job's
egress proxy, a squid (``image.py``) that also sits on the agent's egress
network and lets through only what the pool's allow list names.

The job network is created ``--internal`` with IPv4 inhibited on its bridge:
Docker gives the host no address there and routes it nowhere, so a container
on it reaches the proxy and nothing else, the host included. The proxy's
configuration goes onto a small volume (``put_archive`` before start: the
container's root is read-only, and a tmpfs is not mounted until it starts),
never a file bind-mounted from the host.

The proxy keeps Docker's json-file log (bounded): squid's access log goes to
its stdout, and ``finish`` reads it back after squid has stopped, so every
transaction is there whatever the timing; an attach socket would need a
reader thread for the whole job to get the same. The log holds methods,
hosts, ports, statuses and sizes, never a URL's path or query, and goes away
with the container."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tarfile
import time
from collections.abc import Sequence
from typing import Any

import docker
import docker.errors
import structlog
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from testhide.agent.egress.image import PROXY_USER, ensure_image, forget_image
from testhide.agent.egress.squid import (
    CONFIG_DIR,
    PROXY_PORT,
    READY_LINE,
    parse_access_log,
    parse_allow,
    render_config,
)
from testhide.agent.errors import JobSetupError, RuntimeUnavailable
from testhide.agent.runtime.docker import LABEL, OWNER_LABEL, engine
from testhide.common.fetch import JOB_NETWORK_PREFIX, EgressRequest

log = structlog.get_logger("testhide.agent.egress")

EGRESS_LABEL = "dev.testhide.egress"
"""On what this module makes for a job: "network", "proxy" or "config"."""
NETWORK_PREFIX = JOB_NETWORK_PREFIX  # the control plane checks the fetch step is on it
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10
_POLL_S = 0.05
_PIDS = 64
_MEMORY = 256 * 1024 * 1024
_LOG_OPTIONS = {"max-size": "32m", "max-file": "1"}  # some 400,000 requests


def network_name(job_id: str) -> str:
    return f"{NETWORK_PREFIX}{job_id}"


def proxy_name(job_id: str) -> str:
    return f"testhide-egress-proxy-{job_id}"


def config_volume_name(job_id: str) -> str:
    return f"testhide-egress-conf-{job_id}"


class EgressProxies:
    """Opens a job's egress proxy; one per agent."""

    def __init__(self, client: docker.DockerClient, egress_network: str, owner: str) -> None:
        self._client = client
        self._egress_network = egress_network
        self._owner = owner

    async def open(self, job_id: str, allow: Sequence[str]) -> EgressSession:
        """The job network with its proxy listening; JobSetupError (and nothing
        left behind) when any of it fails."""
        try:
            rules = parse_allow(allow)
        except ValueError as exc:
            raise JobSetupError(str(exc)) from exc
        image = await engine(ensure_image, self._client)
        session = EgressSession(self._client, job_id)
        labels = {LABEL: job_id, OWNER_LABEL: self._owner}
        started = time.monotonic()
        try:
            subnet = await engine(session._create_network, labels)
            await engine(
                session._create_proxy, image, self._egress_network, labels, render_config(rules, subnet)
            )
            await session._wait_ready()
        except BaseException as exc:
            await asyncio.shield(session.close())
            if isinstance(exc, docker.errors.ImageNotFound):
                forget_image()
            if isinstance(exc, docker.errors.DockerException):
                explanation = getattr(exc, "explanation", None) or exc
                raise JobSetupError(f"could not set up the egress proxy: {explanation}") from exc
            raise
        log.info(
            "egress_proxy_started",
            job_id=job_id,
            network=session.network,
            rules=len(rules),
            took_s=round(time.monotonic() - started, 3),
        )
        return session


class EgressSession:
    """A job's network and proxy, from ``EgressProxies.open`` to ``close``."""

    def __init__(self, client: docker.DockerClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id
        self.network = network_name(job_id)
        """The fetch container's ``network_mode``."""
        self.network_id = ""
        self.proxy_url = ""
        """``http://ADDRESS:3128``, the proxy's address on the job network."""
        self._container: Container | None = None
        self._records: list[EgressRequest] | None = None

    def proxy_env(self) -> dict[str, str]:
        return {
            "HTTP_PROXY": self.proxy_url,
            "HTTPS_PROXY": self.proxy_url,
            "http_proxy": self.proxy_url,
            "https_proxy": self.proxy_url,
            "NO_PROXY": "localhost,127.0.0.1",
            "no_proxy": "localhost,127.0.0.1",
        }

    def _create_network(self, labels: dict[str, str]) -> str:
        """Blocking. The job network; returns its IPv4 subnet (CIDR)."""
        network = self._client.networks.create(
            self.network,
            driver="bridge",
            internal=True,
            check_duplicate=True,
            options={"com.docker.network.bridge.inhibit_ipv4": "true"},
            labels={**labels, EGRESS_LABEL: "network"},
        )
        self.network_id = str(network.id)
        configs = (network.attrs.get("IPAM") or {}).get("Config") or []
        subnets = [str(config["Subnet"]) for config in configs if "." in str(config.get("Subnet", ""))]
        if not subnets:
            network.reload()
            configs = (network.attrs.get("IPAM") or {}).get("Config") or []
            subnets = [str(config["Subnet"]) for config in configs if "." in str(config.get("Subnet", ""))]
        if not subnets:
            raise JobSetupError(f"Docker gave the network {self.network} no IPv4 subnet")
        return subnets[0]

    def _create_proxy(self, image: str, egress_network: str, labels: dict[str, str], config: str) -> None:
        """Blocking. Creates, configures, connects and starts the proxy container."""
        try:
            self._client.networks.get(egress_network)
        except docker.errors.NotFound:
            raise JobSetupError(f"the egress network {egress_network!r} does not exist") from None
        volume = self._client.volumes.create(
            config_volume_name(self.job_id), labels={**labels, EGRESS_LABEL: "config"}
        )
        self._container = self._client.containers.create(
            image,
            name=proxy_name(self.job_id),
            labels={**labels, EGRESS_LABEL: "proxy"},
            network=egress_network,
            mounts=[Mount(CONFIG_DIR, volume.name, type="volume")],
            log_config=LogConfig(type=LogConfig.types.JSON, config=_LOG_OPTIONS),
            **_hardening(),
        )
        self._container.put_archive(CONFIG_DIR, _config_tar(config))
        self._client.networks.get(self.network).connect(self._container)
        self._container.start()

    async def _wait_ready(self) -> None:
        """Until squid says it accepts connections; JobSetupError if it stops
        first or takes longer than START_TIMEOUT_S."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                # Squid says so on stderr only: polled, a few times at most.
                while True:
                    if await engine(self._ready):
                        return
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            raise JobSetupError(
                f"the egress proxy did not start listening within {START_TIMEOUT_S:g} s"
            ) from None

    def _ready(self) -> bool:
        assert self._container is not None
        if READY_LINE.encode() in self._container.logs(stdout=False, stderr=True):
            self._container.reload()
            address = self._container.attrs["NetworkSettings"]["Networks"][self.network]["IPAddress"]
            if not address:
                raise JobSetupError(f"the egress proxy has no address on {self.network}")
            self.proxy_url = f"http://{address}:{PROXY_PORT}"
            return True
        self._container.reload()
        if self._container.status in ("exited", "dead"):
            said = self._container.logs(stdout=False, stderr=True, tail=5).decode(errors="replace")
            last = [line for line in said.splitlines() if line.strip()][-1:] or ["no message"]
            raise JobSetupError(f"the egress proxy stopped as it started: {last[0].strip()}")
        return False

    async def finish(self) -> list[EgressRequest]:
        """Stops squid (it logs every transaction before it exits) and returns
        what its access log says, in order. Again: the same records."""
        if self._records is None:
            try:
                self._records = await engine(self._stop_and_read)
            except docker.errors.DockerException as exc:
                raise JobSetupError(f"could not read the egress proxy's log: {exc}") from exc
        return list(self._records)

    def _stop_and_read(self) -> list[EgressRequest]:
        container = self._container or self._client.containers.get(proxy_name(self.job_id))
        container.stop(timeout=STOP_TIMEOUT_S)
        output = container.logs(stdout=True, stderr=False).decode(errors="replace")
        return parse_access_log(output.splitlines())

    async def close(self) -> None:
        """Removes the proxy, its volume and the job network (disconnecting
        anything still on it). Idempotent; what is already gone is fine, and
        what cannot be removed now is logged and left to the leftover sweep."""
        try:
            await engine(_remove_job, self._client, self.job_id)
        except (docker.errors.DockerException, RuntimeUnavailable) as exc:
            log.warning("egress_cleanup_failed", job_id=self.job_id, error=str(exc))


def _hardening() -> dict[str, Any]:
    return {
        "user": PROXY_USER,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "read_only": True,
        "pids_limit": _PIDS,
        "mem_limit": _MEMORY,
        "memswap_limit": _MEMORY,
        "nano_cpus": 1_000_000_000,
        "init": False,
        "stdin_open": False,
        "tty": False,
    }


def _config_tar(config: str) -> bytes:
    data = config.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("squid.conf")
        info.size, info.mode = len(data), 0o444
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _remove_job(client: docker.DockerClient, job_id: str) -> None:
    """Blocking. Removes by name: what a cancelled ``open`` made is found too."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(proxy_name(job_id), force=True)
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_volume(config_volume_name(job_id), force=True)
    _remove_network(client, network_name(job_id))


def _remove_network(client: docker.DockerClient, name: str) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        attached = client.api.inspect_network(name).get("Containers") or {}
        for container_id in attached:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                client.api.disconnect_container_from_network(container_id, name, force=True)
        client.api.remove_network(name)


async def remove_leftover_networks(
    client: docker.DockerClient, owner: str, keep: frozenset[str] = frozenset()
) -> int:
    """Removes the job networks, proxies and proxy volumes agent ``owner``
    left behind (killed while jobs ran), but those of the jobs in ``keep``;
    returns how many networks went."""

    def run() -> int:
        selector: dict[str, Any] = {"label": [f"{OWNER_LABEL}={owner}", EGRESS_LABEL]}
        jobs: set[str] = set()
        for container in client.containers.list(all=True, filters=selector):
            jobs.add(container.labels.get(LABEL, ""))
        for volume in client.volumes.list(filters=selector):
            jobs.add((volume.attrs.get("Labels") or {}).get(LABEL, ""))
        networks = client.networks.list(filters=selector)
        jobs.update((network.attrs.get("Labels") or {}).get(LABEL, "") for network in networks)
        removed = 0
        for job_id in sorted(jobs - keep - {""}):
            existed = any(network.name == network_name(job_id) for network in networks)
            try:
                _remove_job(client, job_id)
            except docker.errors.APIError as exc:
                log.warning("egress_leftover_not_removed", job_id=job_id, error=str(exc))
                continue
            removed += existed
        return removed

    if not owner:
        return 0
    return await engine(run)
