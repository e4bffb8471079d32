"""One planted host read per function, each on the line marked ``# PLANT: <name>``.

tests/test_check.py finds the expected line numbers by searching this file for the markers,
so lines can move freely.
"""
import torch


def item(x):
    return x * x.sum().item()  # PLANT: item


def int_of(x):
    return x[: int(x.shape[0] * x.abs().max())]  # PLANT: int


def if_tensor(x):
    if (x > 0).any():  # PLANT: bool
        return x
    return -x


def tolist(x):
    return [v * 2 for v in x.tolist()]  # PLANT: tolist


def nonzero(x):
    return x.nonzero()  # PLANT: nonzero


def bool_mask(x):
    return x[x > 0]  # PLANT: mask


def masked_select(x):
    return x.masked_select(x > 0)  # PLANT: masked_select


def unique(x):
    return torch.unique(x.round())  # PLANT: unique


def repeat_interleave(x):
    repeats = torch.ones_like(x, dtype=torch.long)
    return x.repeat_interleave(repeats)  # PLANT: repeat_interleave


def repeat_interleave_sized(x):
    repeats = torch.ones_like(x, dtype=torch.long)
    return x.repeat_interleave(repeats, output_size=x.shape[0])  # static size: no read


def mask_assign(x):
    rows = x[:, None].repeat(1, 2)
    rows[x > 0] = torch.ones(2, device=x.device)  # PLANT: mask_assign
    return rows


def numpy(x):
    return x.numpy().sum()  # PLANT: numpy


def asarray(x):
    import numpy as np

    return float(np.asarray(x).sum())  # PLANT: asarray


def cpu(x):
    return x.cpu() + 1  # PLANT: cpu


def to_cpu(x):
    return x.to("cpu") + 1  # PLANT: to_cpu


def repr_(x):
    return f"{x!r}"  # PLANT: repr


def loop(x):
    total = 0.0
    for _ in range(3):
        total += x.sum().item()  # PLANT: loop
    return total


SCALE = torch.tensor(2.0)       # a plain 0-dim tensor: on a CUDA model it stays on the host


def host_value(x):
    return x * SCALE  # PLANT: host_value


def host_value_derived(x, sigmas=torch.linspace(1.0, 0.0, 5)):
    sigma = sigmas[2]                  # a scheduler's host table: still a host value once indexed
    return x - sigma * x  # PLANT: host_value_derived


def factory(x):
    return x + torch.arange(x.shape[0])  # PLANT: factory


def rng(x):
    return x + torch.randn_like(x)  # PLANT: rng


def clean(x):
    """Everything a graph-safe forward may do: shapes, device indices, torch.where, .to(x.device)."""
    idx = torch.arange(x.shape[0], device=x.device)
    y = torch.where(x > 0, x, torch.zeros_like(x)).index_select(0, idx.flip(0))
    y[y > 1] = 1.0  # one mask and a scalar run as masked_fill_: no sync
    scale = torch.tensor(0.5, device=x.device)             # a constant built on the device
    return (y * y.sum() * scale + y[0]).to(x.device).to(torch.float64)


# -- CUDA only: copies between host and device -------------------------------------------------------
def device_to_host(x):
    host = torch.empty(x.shape, dtype=x.dtype)
    host.copy_(x)  # PLANT: d2h
    return host


def host_to_device(x):
    return x + torch.tensor([1.0], device=x.device)  # PLANT: h2d


def host_to_device_copy(x):
    return x + torch.arange(x.shape[0]).to(x.device)  # PLANT: h2d_copy
