"""Where the shipped default model lives (Package.resources/ in a checkout, edge_ds_resources installed)."""

from __future__ import annotations

from pathlib import Path

from .errors import OptionError

DEFAULT_MODEL = "edge-ds-tiny"


def resources_dir() -> Path:
    try:
        import edge_ds_resources  # Package.resources/, mapped to this name by pyproject.toml

        return Path(list(edge_ds_resources.__path__)[0])
    except ImportError:
        return Path(__file__).resolve().parent.parent / "Package.resources"


def default_model_path() -> Path:
    path = resources_dir() / DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise OptionError("path", f"no default model at {path}; give {{option}} (a converted model directory)")
    return path
