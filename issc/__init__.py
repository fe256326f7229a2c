"""issc: shared core used by the hub and the node (protocol, bundles, keys, config)."""

__version__ = "0.1.0"
