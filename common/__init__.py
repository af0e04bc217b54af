"""Pure mathematics and schemas shared by sites and the coordinator (no I/O, no network)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
