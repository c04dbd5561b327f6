"""cnnexplain checkpoints: tensors plus JSON metadata, loadable with ``weights_only=True``.

Layout of the file (a plain ``torch.save`` of a dict)::

    format          "cnnexplain-checkpoint"
    format_version  1
    meta            JSON string: backbone, num_classes, class_names, layer, insert_conv,
                    method, preprocessing, training config, gate description, versions
    state_dict      the network's tensors (including an inserted conv)
    gate            {"W": [K, C]} or {"P": [C, K]} or {} (gate matrices, see models/gates.py)
    train_state     optional: optimizer/scheduler state, epoch, RNG states (for ``resume``)

Loading never executes pickled code: ``torch.load(..., weights_only=True)`` refuses any object
that is not a tensor or plain container, and that refusal becomes a one-line error.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnnexplain import __version__
from cnnexplain.errors import CnnexplainError
from cnnexplain.io import atomic_path

FORMAT = "cnnexplain-checkpoint"
FORMAT_VERSION = 1


def read_tensor_file(path: str | os.PathLike, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with every failure turned into one line."""
    path = Path(path)
    if not path.exists():
        raise CnnexplainError(f"{what} {path} does not exist", "check the path")
    if path.is_dir():
        raise CnnexplainError(f"{what} {path} is a directory, not a file", "pass the .pt file inside it")
    if path.stat().st_size == 0:
        raise CnnexplainError(f"{what} {path} is empty", "re-create or re-download it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "GLOBAL" in msg or "Unsupported global" in msg:
            raise CnnexplainError(
                f"refused to load {what} {path}: it needs pickled Python code to load, which "
                "could run arbitrary code", "re-save it as tensors only (torch.save of a state_dict)") from None
        detail = msg.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise CnnexplainError(f"{what} {path} is corrupt or not a PyTorch file ({_short(detail)})",
                              "re-create or re-download it") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError,
            AttributeError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise CnnexplainError(f"{what} {path} is truncated, corrupt or not a PyTorch file "
                              f"({_short(str(exc))})", "re-create or re-download it") from None


def _short(msg: str, n: int = 120) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


@dataclass
class Checkpoint:
    """What a checkpoint holds; ``meta`` is JSON-able."""

    meta: dict
    state_dict: dict[str, torch.Tensor]
    gate: dict[str, torch.Tensor] = field(default_factory=dict)
    train_state: dict | None = None
    path: Path | None = None


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` atomically (temporary file + rename)."""
    meta = dict(ckpt.meta)
    meta.setdefault("cnnexplain_version", __version__)
    meta.setdefault("torch_version", torch.__version__)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": json.dumps(meta, sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "gate": {k: v.detach().cpu() for k, v in ckpt.gate.items()},
    }
    if ckpt.train_state is not None:
        payload["train_state"] = ckpt.train_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def is_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a cnnexplain checkpoint safely; a plain state_dict or foreign file is refused."""
    obj = read_tensor_file(path)
    if not is_checkpoint(obj):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CnnexplainError(f"{path} is a plain state_dict, not a cnnexplain checkpoint",
                                  "load it with `backbone=NAME` `weights=PATH` instead of `checkpoint`")
        raise CnnexplainError(f"{path} is not a cnnexplain checkpoint",
                              "pass a checkpoint.pt written by cnnexplain train-gated")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CnnexplainError(f"{path} has checkpoint format version {version!r}; this cnnexplain "
                              f"reads up to {FORMAT_VERSION}", "upgrade cnnexplain")
    try:
        meta = json.loads(obj["meta"])
        state = obj["state_dict"]
        gate = obj.get("gate") or {}
        assert isinstance(meta, dict) and isinstance(state, dict) and isinstance(gate, dict)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        assert all(isinstance(v, torch.Tensor) for v in gate.values())
    except (KeyError, ValueError, TypeError, AssertionError):
        raise CnnexplainError(f"checkpoint {path} is damaged (its metadata or tensors are missing)",
                              "re-create it with cnnexplain train-gated") from None
    for key in ("backbone", "num_classes"):
        if key not in meta:
            raise CnnexplainError(f"checkpoint {path} lacks {key!r} in its metadata",
                                  "re-create it with cnnexplain train-gated")
    return Checkpoint(meta=meta, state_dict=state, gate=gate, train_state=obj.get("train_state"),
                      path=Path(path))
