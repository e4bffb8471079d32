"""Models graphrt ships: the causal Wan DiT."""
