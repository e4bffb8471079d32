"""The version of graphrt (a leaf: the compiled-artifact cache keys on it)."""
__version__ = "0.1.0"
