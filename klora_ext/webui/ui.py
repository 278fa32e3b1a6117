"""The K-LoRA accordion (gradio 3.41 on A1111, gradio 4 on Forge: plain components, ``gr.update``, no ``.style()``).

``build`` returns the components in ``FIELDS`` order: that order is the API's positional order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klora_ext.args import FIELDS, KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.log import logger

# Widget per field: ("slider", step) | ("number",) | ("dropdown",) | ("checkbox",) | ("lora",).
# Slider ranges are the args model's bounds, except where a narrower UI range is friendlier (the API accepts the
# model's full range).
_WIDGETS: dict[str, tuple] = {
    "content": ("lora",),
    "content_weight": ("slider", 0.05, -2.0, 2.0),
    "style": ("lora",),
    "style_weight": ("slider", 0.05, -2.0, 2.0),
    "alpha": ("slider", 0.05, 0.0, 5.0),
    "beta": ("slider", 0.05, -2.0, 4.0),
    "gamma_mode": ("dropdown",),
    "gamma": ("number",),
    "schedule": ("dropdown",),
    "clock": ("dropdown",),
    "scope": ("dropdown",),
    "k_multiplier": ("slider", 0.25, 0.25, 16.0),
    "method": ("dropdown",),
    "te_policy": ("dropdown",),
    "hires": ("dropdown",),
    "show_map": ("checkbox",),
}
_MAIN = ("content", "content_weight", "style", "style_weight", "alpha", "beta")
REFRESH_SYMBOL = "\U0001f504"  # 🔄


def elem_id(tab: str, name: str) -> str:
    return f"klora_{tab}_{name}"


def _slider_range(name: str, spec: tuple, value: float) -> tuple[float, float]:
    lo, hi = spec[2], spec[3]
    return min(lo, value), max(hi, value)  # a Settings default outside the friendly range still shows


def _component(gr: Any, name: str, value: Any, tab: str, choices: list[str]) -> Any:
    field = next(f for f in FIELDS if f.name == name)
    spec = _WIDGETS[name]
    common = {"label": field.label, "elem_id": elem_id(tab, name)}
    kind = spec[0]
    if kind == "lora":
        # value "" (a str, never None): the WebUI's paste converts by the control's current value type
        return gr.Dropdown(choices=choices, value=value or "", allow_custom_value=True, **common)
    if kind == "slider":
        lo, hi = _slider_range(name, spec, float(value))
        return gr.Slider(minimum=lo, maximum=hi, step=spec[1], value=value, **common)
    if kind == "number":
        return gr.Number(value=value, **common)
    if kind == "dropdown":
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    return gr.Checkbox(value=bool(value), **common)


def _accordion(tab: str):
    """InputAccordion (A1111 >= 1.6, Forge) or, on anything older, a checkbox inside a plain accordion."""
    import gradio as gr

    try:
        from modules.ui_components import InputAccordion
    except ImportError:
        InputAccordion = None  # noqa: N806
    if InputAccordion is not None:
        acc = InputAccordion(False, label="K-LoRA", elem_id=elem_id(tab, "enabled"))
        return acc, acc
    acc = gr.Accordion("K-LoRA", open=False, elem_id=elem_id(tab, "accordion"))
    return acc, None


def build(
    script: Any,
    is_img2img: bool,
    *,
    list_loras: Callable[[], list[str]],
    refresh_loras: Callable[[], list[str]],
    defaults: KLoraArgs,
    name_for_hash: Callable[[str], str | None] | None = None,
) -> list[Any]:
    import gradio as gr

    try:
        from modules.ui_components import ToolButton
    except ImportError:
        ToolButton = gr.Button  # noqa: N806

    tab = "img2img" if is_img2img else "txt2img"
    loras = list_loras()
    values = defaults.to_dict()
    comps: dict[str, Any] = {}
    container, enabled = _accordion(tab)
    with container:
        if enabled is None:
            enabled = gr.Checkbox(value=False, label="Enable K-LoRA", elem_id=elem_id(tab, "enabled"))
        comps["enabled"] = enabled
        with gr.Row():
            comps["content"] = _component(gr, "content", values["content"], tab, loras)
            comps["content_weight"] = _component(gr, "content_weight", values["content_weight"], tab, loras)
        with gr.Row():
            comps["style"] = _component(gr, "style", values["style"], tab, loras)
            comps["style_weight"] = _component(gr, "style_weight", values["style_weight"], tab, loras)
            refresh = ToolButton(value=REFRESH_SYMBOL, elem_id=elem_id(tab, "refresh"))
        with gr.Row():
            comps["alpha"] = _component(gr, "alpha", values["alpha"], tab, loras)
            comps["beta"] = _component(gr, "beta", values["beta"], tab, loras)
        with gr.Accordion("Advanced", open=False, elem_id=elem_id(tab, "advanced")):
            advanced = [f.name for f in FIELDS if f.name not in _MAIN and f.name != "enabled"]
            for start in range(0, len(advanced), 3):
                with gr.Row():
                    for name in advanced[start : start + 3]:
                        comps[name] = _component(gr, name, values[name], tab, loras)

    def on_refresh() -> tuple[Any, Any]:
        names = refresh_loras()
        return gr.update(choices=names), gr.update(choices=names)

    refresh.click(fn=on_refresh, inputs=[], outputs=[comps["content"], comps["style"]])

    ordered = [comps[f.name] for f in FIELDS]
    script.infotext_fields = infotext_fields(comps, list_loras=list_loras, name_for_hash=name_for_hash)
    script.paste_field_names = [f.infotext for f in FIELDS if f.infotext]
    return ordered


# ---- infotext paste-back --------------------------------------------------------------------------------------------
def parse_pasted(params: dict[str, Any]) -> KLoraArgs | None:
    """KLoraArgs from parsed infotext (None when K-LoRA was not used or the values are unreadable)."""
    try:
        return KLoraArgs.from_infotext(params)
    except KLoraError as exc:
        logger.warning("ignoring K-LoRA parameters in the pasted text: %s", exc)
        return None


def _getter(
    name: str,
    list_loras: Callable[[], list[str]] | None = None,
    name_for_hash: Callable[[str], str | None] | None = None,
) -> Callable[[dict[str, Any]], Any]:
    def get(params: dict[str, Any]) -> Any:
        args = parse_pasted(params)
        if args is None:
            return None  # leave the control as it is
        value = getattr(args, name)
        if name in ("content", "style") and name_for_hash is not None and list_loras is not None:
            shorthash = str(params.get(f"K-LoRA {name} hash", "") or "")
            if value and shorthash and value not in list_loras():
                value = name_for_hash(shorthash) or value  # the file was renamed since: find it by its hash
        return value

    get.__name__ = f"klora_paste_{name}"
    return get


def infotext_fields(
    comps: dict[str, Any],
    *,
    list_loras: Callable[[], list[str]] | None = None,
    name_for_hash: Callable[[str], str | None] | None = None,
) -> list[tuple[Any, Any]]:
    """(component, key-or-function) pairs: pasting a K-LoRA infotext sets every control (fields left out of the short
    infotext get their defaults); pasting one without K-LoRA turns K-LoRA off and leaves the rest alone."""
    out: list[tuple[Any, Any]] = [(comps["enabled"], lambda params: "K-LoRA" in params)]
    for field in FIELDS[1:]:
        if field.infotext:
            out.append((comps[field.name], _getter(field.name, list_loras, name_for_hash)))
    return out
