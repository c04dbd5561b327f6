"""Where and how a command runs: device selection, seeding, and torch.distributed membership."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from cnnexplain.errors import UsageError


def resolve_device(spec: str = "auto"):
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``; ``cuda``; ``cuda:N``.
    Under torchrun with CUDA, ``auto``/``cuda`` pick the rank's LOCAL_RANK device."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"`device={spec}`: CUDA is not available on this machine",
                             "use `device=cpu` or `device=auto`")
        if spec == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        try:
            idx = int(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"`device={spec!r}` is not a device", "use auto, cpu, cuda or cuda:N") from None
        if not 0 <= idx < torch.cuda.device_count():
            raise UsageError(f"`device={spec}`: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)", f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", idx)
    raise UsageError(f"`device={spec!r}` is not a device", "use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices): same seed, same numbers on CPU."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Dist:
    """torch.distributed membership of this process (world_size 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
