"""Where a number came from: package versions and the machine, recorded with every result."""

from __future__ import annotations

import os
import platform
from typing import Any


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    import ase
    import h5py
    import numpy as np
    import torch

    from . import __version__

    return {"forcecentric": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "ase": ase.__version__, "numpy": np.__version__, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core counts, torch threads, GPU name when ``device`` is CUDA, and :func:`versions`."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                            "usable_cores": cores, "torch_threads": torch.get_num_threads(),
                            "device": str(device), **versions()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
