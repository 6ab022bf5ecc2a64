"""Where a process runs: device, rank and mixed precision, from the environment (torchrun-ready)."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from covid_cxr.errors import ConfigError

log = logging.getLogger(__name__)

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


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` (TorchDynamo + Inductor) cannot run on ``device`` here; None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch import _dynamo

        if not _dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python version or platform"
    except Exception as exc:  # pragma: no cover - a broken install
        return f"TorchDynamo cannot be imported ({exc})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton (Inductor's GPU code generator) is not installed or does not support this GPU"
        except ImportError:  # pragma: no cover - older torch
            return "Triton (Inductor's GPU code generator) is not available"
    elif not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (Inductor's CPU code generator needs g++ or clang++)"
    return None


def use_compile(setting: str, device: torch.device) -> bool:
    """Whether ``--compile`` (auto, on, off) compiles the training model on ``device``.

    ``auto`` compiles on CUDA only, and falls back to eager mode with a warning where compile is unavailable.

    Raises:
        ConfigError: ``on`` where torch.compile cannot run.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return False
    reason = compile_unavailable(device)
    if reason is None:
        return True
    if setting == "on":
        raise ConfigError(f"--compile on: {reason}; install it or use --compile off")
    log.warning("--compile auto: training without torch.compile: %s", reason)
    return False
