"""What the control plane, the agent and the CLI truly share: durations, the
agent identity format, and opening a pinned TLS channel."""
