"""``fedrad.server``: what the coordinator runs — the Flower ServerApp with one module per study stage,
the run log, the report, the dashboard, `fedrad local`, and the root `fedrad` command, which mounts the
hospital's commands from ``fedrad.client.cli``.

The top layer: it may import ``fedrad.client`` (shared helpers such as the report primitives a site's
offline validation also uses) and ``fedrad.common``; nothing imports it.
"""
