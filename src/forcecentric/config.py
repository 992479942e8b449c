"""Typed configuration objects.

Configs are YAML files validated into these pydantic models. Unknown keys and wrong types raise a
:class:`~forcecentric.errors.ConfigError` that names the file and the offending key. Every run
writes its resolved config next to its results, and checkpoints store the model config so that
``forcecentric.load`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Hyper-parameters of the Equivariant Transformer force field (TorchMD-Net ET)."""

    hidden_channels: int = Field(128, gt=0, description="feature size F of scalars and vectors")
    num_layers: int = Field(6, gt=0, description="number of equivariant attention layers")
    num_heads: int = Field(8, gt=0, description="attention heads; must divide hidden_channels")
    num_rbf: int = Field(32, gt=0, description="exponential-normal radial basis functions")
    cutoff: float = Field(5.0, gt=0, description="radial cutoff in Angstrom (cosine cutoff)")
    max_z: int = Field(100, gt=0, description="largest atomic number the embedding can hold")
    activation: Literal["silu", "ssp", "tanh", "gelu"] = "silu"
    attn_activation: Literal["silu", "ssp", "tanh", "gelu"] = "silu"
    neighbor_embedding: bool = True
    vector_cutoff: bool = Field(
        True, description="multiply vector messages by the cosine cutoff (smooth forces at r_c)"
    )
    denoise_head: bool = Field(
        False,
        description="add a separate equivariant head that predicts the denoising target "
        "(instead of denoising through the force output)",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_channels % self.num_heads != 0:
            raise ValueError(
                f"hidden_channels ({self.hidden_channels}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        return self


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  '{loc}': {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate(model_cls: type[BaseModel], data: dict[str, Any], source: str = "<dict>") -> Any:
    """Validate ``data`` into ``model_cls`` raising :class:`ConfigError` with every problem."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
