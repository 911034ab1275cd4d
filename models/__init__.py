"""Bundled checkpoints (data, no code): `default`, the model `improv` serves unless told
otherwise (its card: default/README.md). Located by `improv.engine.checkpoint.BUNDLED`."""
