"""``fedrad.client``: everything that runs inside a hospital, and nothing of the coordinator's.

Manifest, imaging, extraction, the feature store, the Flower ClientApp with its privacy guard and egress
ledger, offline validation, and the hospital's commands (`fedrad.client.cli`). It imports only
``fedrad.common`` (tests/test_layers.py checks), so what a hospital runs can be reviewed without the
coordinator's code.
"""
