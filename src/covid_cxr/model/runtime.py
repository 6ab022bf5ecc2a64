"""Where a process runs: device, rank and mixed precision, from the environment (torchrun-ready); what ranks
share: BatchNorm statistics synchronised across ranks (``--sync-bn``), and rank 0's errors."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from covid_cxr.errors import ConfigError, RunError

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


# ----------------------------------------------------------------------------- what ranks share

class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the gradients (every rank's loss depends on it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (every rank's images), for CPU
    processes under gloo, where :class:`torch.nn.SyncBatchNorm` is not implemented (it needs CUDA).

    The same numbers as one process normalising the whole batch: the mean, then the variance around it, are
    summed over ranks (two all-reduces per layer, differentiable, so the input gradient is also the global
    batch's); running statistics get the unbiased global variance, as :class:`torch.nn.BatchNorm2d` does. In eval
    mode it is a plain BatchNorm (no communication). Same parameters and buffers as the BatchNorm it replaces."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])])
        total = _AllReduceSum.apply(local)
        n = total[-1].detach()
        mean = total[:-1] / n
        var = _AllReduceSum.apply(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(float(n) - 1, 1.0)), alpha=m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` synchronised across ranks: :class:`torch.nn.SyncBatchNorm` on CUDA,
    :class:`GlooSyncBatchNorm` elsewhere. Parameters, buffers and ``requires_grad`` are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (GlooSyncBatchNorm, nn.SyncBatchNorm)):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics), so all ranks evaluate the model it saves."""
    for b in module.buffers():
        dist.broadcast(b.data, src)


def all_sum(values: list[float], rt: Runtime) -> list[float]:
    """``values`` summed over ranks (as float64; on this rank's device, as NCCL needs); unchanged in one process."""
    if not rt.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


def on_main(rt: Runtime, fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only; the other ranks wait for it, and raise a :class:`RunError` if it failed
    (instead of waiting forever in the next collective). Returns ``fn``'s result on rank 0, None elsewhere."""
    if not rt.distributed:
        return fn(*args, **kwargs)
    result, failure = None, None
    if rt.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            failure = exc
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, 0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise RunError(f"rank 0 failed ({status[0]}); rank {rt.rank} stops too")
    return result


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
