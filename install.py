"""Run by the WebUI when it loads the extension: make sure the few packages K-LoRA needs are there.

torch, numpy, safetensors and Pillow ship with every A1111/Forge install; this only repairs a broken environment.
gradio belongs to the WebUI and is never installed or pinned here.
"""

from __future__ import annotations

import importlib.util

REQUIRED = {"safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow"}  # module -> pip name


def missing_packages() -> list[str]:
    return [pip_name for module, pip_name in REQUIRED.items() if importlib.util.find_spec(module) is None]


def main() -> None:
    missing = missing_packages()
    if not missing:
        return
    try:
        import launch  # the WebUI's installer helpers; only present when the WebUI runs this file
    except ImportError:
        print(f"[K-LoRA] missing packages: {', '.join(missing)}; install them with pip")
        return
    for name in missing:
        launch.run_pip(f"install {name}", f"{name} for K-LoRA")


if __name__ == "__main__":
    main()
