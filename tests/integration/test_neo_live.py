"""Opt-in live tier against a running Forge Neo (``backend/`` Forge line, gradio 4; started with ``--api``).

    KLORA_NEO_URL=http://127.0.0.1:7862 python -m pytest -q tests/integration/test_neo_live.py

Environment: ``KLORA_NEO_URL`` (required, else skipped), ``KLORA_CONTENT`` / ``KLORA_STYLE`` (LoRA names on the
server; default the two of make_random_loras.py), ``KLORA_NEO_STEPS`` (4), ``KLORA_NEO_SIZE`` (64),
``KLORA_NEO_TIMEOUT`` (seconds per request, 900). K-LoRA runs there through its Forge adapter (feature detection),
so the version endpoint must report ``forge``. The checks are in forks_live.py.
"""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
from forks_live import LiveTier

pytestmark = [pytest.mark.integration]


class TestNeoLive(LiveTier):
    URL = os.environ.get("KLORA_NEO_URL", "").rstrip("/")
    HOST = "forge"
    STEPS = int(os.environ.get("KLORA_NEO_STEPS", "4"))
    SIZE = int(os.environ.get("KLORA_NEO_SIZE", "64"))
    TIMEOUT = float(os.environ.get("KLORA_NEO_TIMEOUT", "900"))
    HIRES_EXTRA: ClassVar[dict] = {
        "hr_additional_modules": ["Use same choices"]
    }  # what the UI sends; Neo's API default is None
