"""Opt-in live tier against a running Forge Classic (Haoming02's ``classic`` branch: ``ldm_patched`` backend,
gradio 3.41; started with ``--api``).

    KLORA_CLASSIC_URL=http://127.0.0.1:7863 python -m pytest -q tests/integration/test_classic_live.py

Environment: ``KLORA_CLASSIC_URL`` (required, else skipped), ``KLORA_CONTENT`` / ``KLORA_STYLE``,
``KLORA_CLASSIC_STEPS`` (4), ``KLORA_CLASSIC_SIZE`` (64), ``KLORA_CLASSIC_TIMEOUT`` (900). K-LoRA runs there through
its ldm_patched adapter, so the version endpoint must report ``ldm_patched``. The checks are in forks_live.py.
"""

from __future__ import annotations

import os

import pytest
from forks_live import LiveTier

pytestmark = [pytest.mark.integration]


class TestClassicLive(LiveTier):
    URL = os.environ.get("KLORA_CLASSIC_URL", "").rstrip("/")
    HOST = "ldm_patched"
    STEPS = int(os.environ.get("KLORA_CLASSIC_STEPS", "4"))
    SIZE = int(os.environ.get("KLORA_CLASSIC_SIZE", "64"))
    TIMEOUT = float(os.environ.get("KLORA_CLASSIC_TIMEOUT", "900"))
