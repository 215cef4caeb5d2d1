"""Which device and numeric precision a worker runs its model at.

Kept apart from loading because the engines decide the device (Spark hands each task a GPU
address; Beam and the consumer pick the first visible one) while the loader only obeys.
"""

from __future__ import annotations

import os
from typing import Literal, cast

import torch

from transforms.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16", "int8"]
DeviceSetting = Literal["auto", "cpu", "cuda"]


def resolve_device(setting: str = "auto", *, gpu_address: str | None = None) -> torch.device:
    """``auto`` means CUDA when a GPU is visible, else CPU. ``gpu_address`` is the ordinal a
    scheduler assigned to this task (Spark's ``TaskContext.resources()['gpu']``)."""
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"model.device must be auto, cpu or cuda, not {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if setting == "cuda":
            raise ConfigError("model.device is cuda but no CUDA device is visible to this worker")
        return torch.device("cpu")
    index = int(gpu_address) if gpu_address not in (None, "") else 0
    return torch.device("cuda", index)


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """Map the configured precision onto what this device can do, refusing impossible combos."""
    if setting == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if setting not in ("fp32", "bf16", "fp16", "int8"):
        raise ConfigError(f"model.precision must be auto, fp32, bf16, fp16 or int8, not {setting!r}")
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError("model.precision fp16 needs a GPU; on CPU use fp32, bf16 or int8")
    # bf16 runs on any CPU but only pays off with AMX / AVX512-BF16 (Sapphire Rapids and later):
    # there MiniLM ran 2.7x fp32 with cosine >= 0.9999 to it; without them it can be slower.
    if setting == "int8" and device.type != "cpu":
        raise ConfigError("model.precision int8 (dynamic quantisation) runs on CPU only; on GPU use bf16 or fp16")
    return cast(Precision, setting)


def configure_threads(cores: int | None) -> int:
    """Match torch's intra-op threads to the cores this task owns, so N concurrent tasks on an
    N-core executor do not each spawn N threads and thrash.

    Where a scheduler assigned ``cores``, the tokenizer's Rust thread pool (rayon, sized once, at
    its first parallel call in the process) is held to them too, unless ``RAYON_NUM_THREADS`` is
    already set: by default every worker's pool takes every core of the machine, so N workers
    tokenising at once run N x machine-cores threads.

    Without ``cores`` (a library caller, the driver) the caller's own setting is kept, only capped
    at the cores this process may run on: resetting it would silently undo a
    ``torch.set_num_threads(1)`` made before loading.
    """
    available = max(1, len(os.sched_getaffinity(0)))
    n = max(1, cores) if cores else min(torch.get_num_threads(), available)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if cores:
        os.environ.setdefault("RAYON_NUM_THREADS", str(n))
    return n


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int8_engine(flags: frozenset[str], supported: list[str], current: str) -> str:
    """The quantized engine for int8 CPU inference: oneDNN where the CPU has AMX int8 tiles.

    torch's default on x86 packs dynamic int8 Linears for fbgemm, which does not use AMX. On an
    AMX machine (Intel Xeon, 2 cores) MiniLM's int8 forward ran 1.29-1.38x fp32 that way and
    1.53-1.68x with oneDNN (5 interleaved runs each on 1.5k texts; cosine to fp32 min 0.9955), at
    the old 8,192-token CPU batch cap; at today's 2,048 oneDNN ran 1.93-2.15x (benchmark, 20k rows).
    Elsewhere the default stays: without AMX it was not measured.
    """
    if "amx_int8" in flags and "onednn" in supported:
        return "onednn"
    return current
