"""Hand-written GPU kernels (Triton), each a torch.library custom op with an aten reference."""
