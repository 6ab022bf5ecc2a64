"""Where a process runs: device, rank and mixed precision, from the environment (torchrun-ready)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covid_cxr.errors import ConfigError

DEVICE_HELP = "'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'"


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device and rank, from the environment (torchrun sets RANK etc.)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device(device: str) -> str:
    """``device`` if it is a valid choice (auto, cpu, cuda, cuda:N), else a :class:`ConfigError`."""
    d = str(device)
    if d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ConfigError(f"--device {device!r} is not valid; use {DEVICE_HELP}")


def resolve_device(device: str = "auto", local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The torch device for ``device`` (see :data:`DEVICE_HELP`); under torchrun each rank gets its GPU.

    Raises:
        ConfigError: an invalid name, or CUDA asked for but not available.
    """
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} requested but CUDA is not available; use --device cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if distributed else (dev.index or 0))
    return dev


def setup_runtime(device: str = "auto") -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, world > 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; None (full precision) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
