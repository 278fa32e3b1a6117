"""X/Y/Z plot axes for K-LoRA.

Each cell's value is validated through the args model and stored in ``p._klora_xyz`` (``run.XYZ_ATTR``), a fresh dict
per cell (the plot shallow-copies ``p``), which ``process()`` applies on top of the script's args. Choosing a K-LoRA
axis turns K-LoRA on for the plot unless the ``[K-LoRA] Enabled`` axis says otherwise.

Registration runs in ``on_before_ui`` (after every script is imported, before the plot builds its axis list), is
idempotent (labels already present are skipped) and runs again after a UI reload, when the plot module is new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from klora_ext.args import FIELD_BY_NAME, coerce
from klora_ext.log import logger
from klora_ext.webui.run import XYZ_ATTR

PREFIX = "[K-LoRA]"
AXES: tuple[tuple[str, str, type], ...] = (
    ("[K-LoRA] Alpha", "alpha", float),
    ("[K-LoRA] Beta", "beta", float),
    ("[K-LoRA] Method", "method", str),
    ("[K-LoRA] Schedule", "schedule", str),
    ("[K-LoRA] Content LoRA", "content", str),
    ("[K-LoRA] Style LoRA", "style", str),
    ("[K-LoRA] Enabled", "enabled", str),
)
XYZ_MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid", "xyz_grid")


def find_xyz_module() -> Any | None:
    try:
        from modules import scripts
    except ImportError:
        return None
    for data in getattr(scripts, "scripts_data", []):
        module_name = getattr(data.script_class, "__module__", "")
        path = str(getattr(data, "path", ""))
        if module_name in XYZ_MODULE_NAMES or path.replace("\\", "/").endswith("scripts/xyz_grid.py"):
            return data.module
    return None


def make_apply(name: str) -> Callable[[Any, Any, Any], None]:
    field = FIELD_BY_NAME[name]

    def apply(p: Any, x: Any, xs: Any) -> None:
        value = coerce(field, x)
        cell = dict(getattr(p, XYZ_ATTR, None) or {})  # a new dict: copies of p must not share one
        cell[name] = value
        if name != "enabled":
            cell.setdefault("enabled", True)
        setattr(p, XYZ_ATTR, cell)

    apply.__name__ = f"klora_apply_{name}"
    return apply


def make_confirm(name: str, resolve: Callable[[str], Any] | None = None) -> Callable[[Any, Iterable[Any]], None]:
    field = FIELD_BY_NAME[name]

    def confirm(p: Any, xs: Iterable[Any]) -> None:
        for x in xs:
            value = coerce(field, x)  # KLoraError names the field and the allowed values
            if resolve is not None and field.kind == "str" and value:
                resolve(value)  # LoRA names: fail before the first cell, with close matches

    confirm.__name__ = f"klora_confirm_{name}"
    return confirm


def _choices(name: str, list_loras: Callable[[], list[str]]) -> Callable[[], list[str]] | None:
    field = FIELD_BY_NAME[name]
    if field.kind == "choice":
        return lambda: list(field.choices)
    if field.kind == "bool":
        return lambda: ["True", "False"]
    if field.kind == "str":
        return lambda: list(list_loras())
    return None


def register(
    *, list_loras: Callable[[], list[str]] = list, resolve: Callable[[str], Any] | None = None, module: Any = None
) -> int:
    """Add the axes to the X/Y/Z plot script; returns how many were added (0 when present or no plot script)."""
    try:
        xyz = module if module is not None else find_xyz_module()
        if xyz is None:
            return 0
        present = {getattr(o, "label", None) for o in xyz.axis_options}
        added = 0
        for label, name, kind in AXES:
            if label in present:
                continue
            cost = 0.5 if name in ("content", "style") else 0.0  # new pair: new scores, re-merged layers
            xyz.axis_options.append(
                xyz.AxisOption(
                    label,
                    kind,
                    make_apply(name),
                    confirm=make_confirm(name, resolve),
                    cost=cost,
                    choices=_choices(name, list_loras),
                )
            )
            added += 1
        return added
    except Exception as exc:  # noqa: BLE001 - never break the WebUI's UI build over optional axes
        logger.warning("could not add the X/Y/Z plot axes (%s)", exc)
        return 0
