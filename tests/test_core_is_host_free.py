"""The core must import and run with no WebUI: modules.*, gradio and the builtin Lora modules are blocked here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(p.stem for p in (ROOT / "klora_ext").glob("*.py") if p.stem != "__init__")

SCRIPT = f"""
import sys
BLOCKED = ("modules", "gradio", "networks", "network", "launch", "backend", "ldm_patched")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked host import: " + name)
        return None
sys.meta_path.insert(0, Block())
import importlib
for name in {CORE!r}:
    importlib.import_module("klora_ext." + name)
import klora_ext.webui.run, klora_ext.webui.adapter_base, klora_ext.webui.api  # host-neutral glue
print("ok", len({CORE!r}))
"""


def test_core_imports_without_any_host_module() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")
    assert "lora_file" in CORE and "scoring" in CORE and "plan" in CORE
