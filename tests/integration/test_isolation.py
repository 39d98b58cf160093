"""What a job can see and do from inside its container."""

from __future__ import annotations

import pytest

from tests.harness import JOB_IMAGE, Cli

pytestmark = pytest.mark.docker

PROBE = r"""
echo "links: $(ls /sys/class/net | tr '\n' ' ')"
grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
echo "uid: $(id -u)"
touch /rootfs-write 2>/dev/null && echo "root: writable" || echo "root: read-only"
touch /tmp/ok && echo "tmp: writable"
touch /workspace/ok && echo "workspace: writable"
ls /var/run/docker.sock /run/docker.sock 2>/dev/null && echo "docker socket: present" || echo "docker socket: absent"
"""


async def run_probe(cli: Cli, *extra: str) -> dict[str, str]:
    result = await cli("run", "--image", JOB_IMAGE, *extra, "--", "sh", "-c", PROBE)
    assert result.returncode == 0, result.stderr
    facts = {}
    for line in result.stdout.decode().splitlines():
        key, _, value = line.partition(":")
        facts[key.strip()] = value.strip()
    return facts


async def test_the_job_container_is_locked_down(docker_agent, cli: Cli) -> None:
    facts = await run_probe(cli)
    assert facts["links"] == "lo"
    assert int(facts["CapEff"], 16) == 0
    assert int(facts["CapPrm"], 16) == 0
    assert int(facts["CapBnd"], 16) == 0
    assert facts["NoNewPrivs"] == "1"
    assert facts["Seccomp"] == "2"  # Docker's default profile is in force
    assert facts["uid"] != "0"
    assert facts["root"] == "read-only"
    assert facts["tmp"] == "writable"
    assert facts["workspace"] == "writable"
    assert facts["docker socket"] == "absent"


async def test_a_fork_loop_hits_the_pids_limit(docker_agent, cli: Cli) -> None:
    script = "i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; echo spawned-all"
    result = await cli("run", "--image", JOB_IMAGE, "--pids", "32", "--", "sh", "-c", script)
    assert b"spawned-all" not in result.stdout
    assert b"can't fork" in result.stderr or b"Resource temporarily unavailable" in result.stderr
    assert result.returncode != 0


async def test_memory_and_cpu_limits_apply(docker_agent, cli: Cli) -> None:
    result = await cli("run", "--image", JOB_IMAGE, "--memory", "64m", "--cpus", "0.5", "--", "sh", "-c",
                       "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null;"
                       "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max 2>/dev/null; true")
    out = result.stdout.decode()
    assert str(64 * 1024 * 1024) in out
    assert "50000" in out


async def test_no_network_even_to_the_host(docker_agent, cli: Cli) -> None:
    result = await cli("run", "--image", JOB_IMAGE, "--", "sh", "-c",
                       "wget -T 2 -q -O- http://127.0.0.1:1/ 2>&1; ip route 2>&1; echo done")
    assert b"done" in result.stdout
    assert b"default" not in result.stdout  # no route anywhere
