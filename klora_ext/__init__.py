"""K-LoRA: training-free fusion of a content LoRA and a style LoRA (host-free core)."""

from __future__ import annotations

__version__ = "0.1.0"
