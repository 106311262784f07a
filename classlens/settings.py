"""All configuration, read from the environment into one typed object.

Nothing reads the environment at import time: entry points build a
:class:`Settings` (``Settings()``) and pass it down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "classlens"


class Settings(BaseSettings):
    """``CLASSLENS_*`` environment variables, typed."""

    model_config = SettingsConfigDict(env_prefix="CLASSLENS_", extra="ignore")

    # Extra model store roots, searched first (os.pathsep-separated in the
    # environment: CLASSLENS_MODEL_DIRS=/models:/more).
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Local state: models added with `classlens models add` (data_dir/models) and,
    # without Redis, the embedded broker, result store and cache.
    data_dir: Path = Field(default_factory=_default_data_dir)

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p]
        return value

    @property
    def user_model_dir(self) -> Path:
        """Where ``classlens models add`` writes unless told otherwise."""
        return self.model_dirs[0] if self.model_dirs else self.data_dir / "models"

    @property
    def model_roots(self) -> list[Path]:
        """Store roots in search order; the bundled demo models come last (see Catalog.default)."""
        roots = [*self.model_dirs, self.data_dir / "models"]
        return list(dict.fromkeys(roots))
