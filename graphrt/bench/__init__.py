"""``python -m graphrt.bench``: reference, eager, graphs, chunk graph, graphs+inductor and the
``torch.compile`` peer on one config, in one run. See :mod:`graphrt.bench.core`."""
from graphrt.bench.core import MODES, PRESETS, BenchConfig, run

__all__ = ["MODES", "PRESETS", "BenchConfig", "run"]
