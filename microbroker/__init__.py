"""microbroker: a minimal tunnel broker for mesh-network exits."""

__version__ = "0.1.0"
