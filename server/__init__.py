"""What the coordinator runs: the Flower ServerApp and one module per study stage.

Empty until the federated study engine lands (issue 3); the stage modules will call the
`common/` function pairs (e.g. `fedrad.common.combat`) that already exist.
"""
