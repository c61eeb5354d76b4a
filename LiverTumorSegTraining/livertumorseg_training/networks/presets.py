"""Preset lookup shared by the networks."""

from __future__ import annotations


def preset_config(presets: dict, preset) -> dict:
    """A copy of a preset's configuration; ``preset`` is a key of ``presets`` or a dict like its entries."""
    if isinstance(preset, str):
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(presets)}")
        return dict(presets[preset])
    return dict(preset)
