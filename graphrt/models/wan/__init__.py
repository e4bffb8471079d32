"""The causal Wan 2.1 DiT: config, upstream-style reference, graph-safe model, checkpoints."""
from graphrt.models.wan.checkpoint import (load_checkpoint, save_checkpoint, state_dict_from_diffusers,
                                           state_dict_to_diffusers)
from graphrt.models.wan.causal import CausalWan
from graphrt.models.wan.config import WanConfig
from graphrt.models.wan.reference import ReferenceWan

__all__ = ["WanConfig", "ReferenceWan", "CausalWan", "load_checkpoint", "save_checkpoint",
           "state_dict_from_diffusers", "state_dict_to_diffusers"]
