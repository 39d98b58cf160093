"""The operator's ``testhide-controlplane`` commands, one module per concern.

Each module holds click commands that parse, call and print; ``controlplane.cli``
registers them on its ``main`` group."""
