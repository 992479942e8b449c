"""forcecentric: force-centric pre-training of equivariant molecular force fields."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Calculator"]


def __getattr__(name: str):
    # Lazy imports keep ``import forcecentric`` light (no Lightning / ASE at import time).
    if name == "load":
        from .checkpoint import load

        return load
    if name == "Calculator":
        from .md.calculator import Calculator

        return Calculator
    raise AttributeError(f"module 'forcecentric' has no attribute {name!r}")
