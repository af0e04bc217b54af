"""Pure mathematics and schemas shared by sites and the coordinator (no I/O, no network)."""
