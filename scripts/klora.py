"""K-LoRA entry point for AUTOMATIC1111 WebUI and Forge: everything lives in the klora_ext package.

The WebUI imports every file in scripts/ as a script; this one only exposes the shared Script class and registers
the callbacks (the WebUI clears callbacks before each scripts reload, so they are registered again on every import).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    # A1111 puts the extension folder on sys.path only while importing its scripts; klora_ext imports lazily later.
    sys.path.append(_ROOT)

from klora_ext.webui.script import Script, register_callbacks  # noqa: E402

register_callbacks()

__all__ = ["Script"]
