"""Helpers shared by the scripts/bench_*.py benchmarks."""

from __future__ import annotations

import json
import os

import torch


def sync(device: str) -> None:
    """Waits for queued GPU work, so wall-clock timings cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def write_json(path: str, result: object) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
