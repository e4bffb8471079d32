"""graphrt: a CUDA-graph / torch.compile static-shape runtime for autoregressive video DiTs."""
from graphrt.errors import GraphrtError

__version__ = "0.1.0"
__all__ = ["GraphrtError"]
