"""The one logger of the extension; every line carries the "[K-LoRA]" prefix."""

from __future__ import annotations

import logging

logger = logging.getLogger("K-LoRA")

if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[K-LoRA] %(levelname)s: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    # The WebUI configures the root logger too; don't print every line twice.
    logger.propagate = False
