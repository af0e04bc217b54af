"""``fedrad.common``: the mathematics and schemas both sides share; no I/O, no network, no Flower process.

The lowest layer: it imports neither ``fedrad.client`` nor ``fedrad.server`` (tests/test_layers.py checks),
so a hospital's auditor and the coordinator read the same federated algorithm in one place — each as a
site-side ``site_<step>`` function and a coordinator-side ``combine_<step>``/``update_<step>`` function.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrad")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
