"""Run-time settings shared by every chapter: seeding, device choice, quick mode, progress bars.

Library code never touches global random state on its own; it takes a
``torch.Generator`` made by :func:`generator`. Notebooks call :func:`seed_everything`
once, after their parameters cell, so that plain ``torch.randn`` calls in the
narrative are reproducible too.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nested_lab.parameters import check_range

DEVICE_ENV = "NESTED_LAB_DEVICE"
QUICK_ENV = "NESTED_LAB_QUICK"
HEADLESS_ENV = "NESTED_LAB_HEADLESS"
KNOWN_DEVICES = ("cpu", "cuda", "mps")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's legacy global state and torch (CPU and CUDA)."""
    _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    _check_seed(seed)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def generators(seeds: list[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent generator per seed, for multi-seed experiments."""
    return [generator(s, device) for s in seeds]


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run a block that draws from torch's global generator (``nn.Linear`` initialisation,
    ``F.gumbel_softmax``) with that generator seeded by ``seed``, restoring its state afterwards."""
    _check_seed(seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run a block with torch using ``count`` CPU threads, restoring the previous count afterwards.
    Small models train faster on one thread: the pool's synchronisation costs more than it gives."""
    count = check_range("thread count", count, 1, integer=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_seed(seed: int) -> None:
    check_range("seed", seed, 0, integer=True)


def available_devices() -> list[str]:
    """Devices torch can use on this machine, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def device(requested: str | None = None) -> torch.device:
    """The device to compute on: cuda > mps > cpu, unless ``requested`` or
    env ``NESTED_LAB_DEVICE`` names one.

    Raises ``ValueError`` for an unknown device name and ``RuntimeError`` for a
    known one this machine does not have.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(requested).__name__}")
    name = requested if requested is not None else os.environ.get(DEVICE_ENV, "").strip()
    if not name:
        return torch.device(available_devices()[0])
    kind = name.partition(":")[0]
    if not re.fullmatch(rf"({'|'.join(KNOWN_DEVICES)})(:\d+)?", name):
        origin = "argument" if requested is not None else f"env {DEVICE_ENV}"
        raise ValueError(
            f"unknown device {name!r} (from {origin}); allowed: "
            f"{', '.join(KNOWN_DEVICES)}, optionally with an index such as 'cuda:1'"
        )
    if kind not in available_devices():
        raise RuntimeError(
            f"device {name!r} is not available on this machine; available: {', '.join(available_devices())}"
        )
    return torch.device(name)


def is_quick(default: bool = False) -> bool:
    """The QUICK flag from env ``NESTED_LAB_QUICK`` ("1" = quick, "0" = full)."""
    raw = os.environ.get(QUICK_ENV)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{QUICK_ENV}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def build_directory() -> Path:
    """``_build`` under the book's root: the nearest folder above the working directory that holds
    ``_toc.yml`` (the working directory itself when there is none)."""
    here = Path.cwd().resolve()
    root = next((p for p in (here, *here.parents) if (p / "_toc.yml").exists()), here)
    return root / "_build"


def is_headless() -> bool:
    """True when env ``NESTED_LAB_HEADLESS`` is "1" (set by the book build and the tests)."""
    return os.environ.get(HEADLESS_ENV, "0").strip() == "1"


def progress(iterable=None, **kwargs):
    """A ``tqdm`` progress bar: the notebook widget in JupyterLab, plain text on
    stderr when headless, so that no widget reaches the published HTML."""
    if is_headless():
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)
