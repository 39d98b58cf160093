"""Where job containers run: a ``ContainerRuntime`` protocol, Docker behind it."""

from testhide.agent.runtime.base import (
    ContainerExit,
    ContainerRuntime,
    ContainerSpec,
    OutputQueue,
    RunningContainer,
)

__all__ = ["ContainerExit", "ContainerRuntime", "ContainerSpec", "OutputQueue", "RunningContainer"]
