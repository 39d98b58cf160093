"""What a job can see and do from inside its container."""

from __future__ import annotations

import asyncio

import pytest
from docker import DockerClient

from testhide.agent.daemon import Agent
from tests.harness import JOB_IMAGE, Cli

pytestmark = pytest.mark.docker

PROBE = r"""
echo "links: $(ls /sys/class/net | tr '\n' ' ')"
grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
echo "uid: $(id -u)"
touch /rootfs-write 2>/dev/null && echo "root: writable" || echo "root: read-only"
touch /tmp/ok && echo "tmp: writable"
touch /workspace/ok && echo "workspace: writable"
ls /var/run/docker.sock /run/docker.sock 2>/dev/null && echo "docker socket: present" \
  || echo "docker socket: absent"
"""


async def run_probe(cli: Cli, *extra: str) -> dict[str, str]:
    result = await cli("run", "--image", JOB_IMAGE, *extra, "--", "sh", "-c", PROBE)
    assert result.returncode == 0, result.stderr
    facts = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition(":")
        facts[key.strip()] = value.strip()
    return facts


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_the_job_container_is_locked_down(docker_agent: Agent, cli: Cli, runtime: str) -> None:
    facts = await run_probe(cli, "--runtime", runtime)
    assert facts["links"] == "lo"
    assert int(facts["CapEff"], 16) == 0
    assert int(facts["CapPrm"], 16) == 0
    assert int(facts["CapBnd"], 16) == 0
    if runtime == "runc":  # gVisor 2022 does not report it in /proc; see the configuration test below
        assert facts["NoNewPrivs"] == "1"
    if runtime == "runc":
        assert facts["Seccomp"] == "2"  # Docker's default profile is in force (gVisor filters in its sentry)
    assert facts["uid"] != "0"
    assert facts["root"] == "read-only"
    assert facts["tmp"] == "writable"
    assert facts["workspace"] == "writable"
    assert facts["docker socket"] == "absent"


async def test_a_fork_loop_hits_the_pids_limit(docker_agent: Agent, cli: Cli) -> None:
    script = "i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; echo spawned-all"
    result = await cli("run", "--image", JOB_IMAGE, "--pids", "32", "--", "sh", "-c", script)
    assert b"spawned-all" not in result.stdout
    assert b"can't fork" in result.stderr or b"Resource temporarily unavailable" in result.stderr
    assert result.returncode != 0


async def test_memory_and_cpu_limits_apply(docker_agent: Agent, cli: Cli) -> None:
    result = await cli(
        "run",
        "--image",
        JOB_IMAGE,
        "--memory",
        "64m",
        "--cpus",
        "0.5",
        "--",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null;"
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max 2>/dev/null; true",
    )
    out = result.stdout.decode()
    assert str(64 * 1024 * 1024) in out
    assert "50000" in out


async def test_no_network_even_to_the_host(docker_agent: Agent, cli: Cli) -> None:
    result = await cli(
        "run",
        "--image",
        JOB_IMAGE,
        "--",
        "sh",
        "-c",
        "wget -T 2 -q -O- http://127.0.0.1:1/ 2>&1; ip route 2>&1; echo done",
    )
    assert b"done" in result.stdout
    assert b"default" not in result.stdout  # no route anywhere


async def test_runsc_runs_the_job_under_gvisor(docker_agent: Agent, cli: Cli) -> None:
    result = await cli("run", "--runtime", "runsc", "--image", JOB_IMAGE, "--", "dmesg")
    assert result.returncode == 0, result.stderr
    assert b"gVisor" in result.stdout
    plain = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c", "dmesg 2>&1; true")
    assert b"gVisor" not in plain.stdout  # the control: runc is the host kernel


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_the_running_container_is_configured_locked_down(
    docker_agent: Agent, cli: Cli, docker_client: DockerClient, runtime: str
) -> None:
    job_id = (
        (
            await cli(
                "run",
                "-d",
                "--runtime",
                runtime,
                "--pids",
                "64",
                "--memory",
                "256m",
                "--cpus",
                "1",
                "--image",
                JOB_IMAGE,
                "--",
                "sh",
                "-c",
                "echo up; exec sleep 3600",
            )
        )
        .stdout.decode()
        .strip()
    )
    follower = await cli.start("logs", "--follow", job_id)
    assert follower.stdout is not None
    assert await asyncio.wait_for(follower.stdout.readline(), 60) == b"up\n"
    [container] = docker_client.containers.list(filters={"label": f"dev.testhide.job={job_id}"})
    host = container.attrs["HostConfig"]
    assert host["Runtime"] == runtime
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any("seccomp" in opt or "apparmor=unconfined" in opt for opt in host["SecurityOpt"])
    assert host["ReadonlyRootfs"] is True
    assert host["Privileged"] is False
    assert (host["PidsLimit"], host["Memory"], host["NanoCpus"]) == (64, 256 * 1024**2, 10**9)
    assert container.attrs["Config"]["User"] == "65534:65534"
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert set(mounts) == {"/workspace"}
    assert mounts["/workspace"]["Type"] == "volume"
    assert not host["Binds"]
    assert "docker.sock" not in str(container.attrs)
    assert (await cli("cancel", job_id)).returncode == 0
    await asyncio.wait_for(follower.wait(), 30)
