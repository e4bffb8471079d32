"""``python -m graphrt.bench``: reference, eager, graphs, chunk graph, graphs+inductor and the
``torch.compile`` peer on one config, in one run. See :mod:`graphrt.bench.core`."""
from graphrt.bench.core import run
from graphrt.bench.presets import MODES, PRESETS, BenchConfig

__all__ = ["MODES", "PRESETS", "BenchConfig", "run"]
