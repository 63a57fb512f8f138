"""GPU identity and CUDA IPC handles, as the GPU-direct transport needs them.

GPUs are named by UUID, never by index: Ray gives each actor its own CUDA_VISIBLE_DEVICES, so
`cuda:0` is a different card in the Thinker and in the DiT. A CUDA IPC handle made by torch
(`reduce_tensor`) names the device by the sender's index; the receiver rewrites it to its
own index of the same UUID before opening it.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch


def resolve(device: torch.device | str) -> torch.device:
    """`cuda` without an index means the current device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(resolve(device)).uuid)


@lru_cache(maxsize=1)
def visible_gpus() -> tuple[str, ...]:
    """UUIDs of the GPUs this process sees, by local index."""
    if not torch.cuda.is_available():
        return ()
    return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))


def export_ipc(tensor: torch.Tensor) -> tuple[Any, tuple]:
    """A picklable handle to `tensor`'s memory that another process on the same node can
    open; the sender must keep `tensor` alive until the receiver is done with it."""
    from torch.multiprocessing.reductions import reduce_tensor

    return reduce_tensor(tensor)


def on_device(handle: tuple[Any, tuple], index: int) -> tuple[Any, tuple, dict]:
    """The handle's rebuild call with its device replaced by `index` (this process's index of
    the sender's GPU): (function, args, kwargs)."""
    rebuild, args = handle
    bound = inspect.signature(rebuild).bind(*args)
    if "storage_device" not in bound.arguments:
        raise RuntimeError(f"{rebuild.__qualname__} has no storage_device argument: not a CUDA tensor handle of this torch")
    bound.arguments["storage_device"] = index
    return rebuild, bound.args, bound.kwargs


def open_ipc(handle: tuple[Any, tuple], index: int) -> torch.Tensor:
    """The sender's tensor, mapped (not copied) into this process on local GPU `index`."""
    rebuild, args, kwargs = on_device(handle, index)
    return rebuild(*args, **kwargs)
