"""The K-LoRA accordion (gradio 3.41 on A1111, gradio 4 on Forge: plain components, ``gr.update``, no ``.style()``).

``build`` returns the components in ``FIELDS`` order: that order is the API's positional order.
"""

from __future__ import annotations

import threading
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


def lora_choices(names: list[str]) -> list[str]:
    """The picker's choices: an empty entry first. gradio 4 (Forge) shows the first choice in a Dropdown whose
    value is empty on a fresh page (both pickers would show the same LoRA, one the user never chose); with "" first
    it shows nothing, as gradio 3 does, and the empty entry lets a user clear a picker."""
    return [""] + [n for n in names if n]


def _slider_range(name: str, spec: tuple, value: float) -> tuple[float, float]:
    lo, hi = spec[2], spec[3]
    return min(lo, value), max(hi, value)  # a Settings default outside the friendly range still shows


def _component(gr: Any, name: str, value: Any, tab: str, choices: list[str]) -> Any:
    field = next(f for f in FIELDS if f.name == name)
    spec = _WIDGETS[name]
    common = {"label": field.label, "elem_id": elem_id(tab, name)}
    kind = spec[0]
    if kind == "lora":
        # value "" (a str, never None): the WebUI's paste converts by the control's current value type.
        return gr.Dropdown(choices=lora_choices(choices), value=value or "", allow_custom_value=True, **common)
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
    preview: Callable[..., Any] | None = None,
    steps: Any = None,
) -> list[Any]:
    """The accordion. ``preview(values, steps, progress)`` -> ``klora_ext.webui.preview.Preview`` draws the plan
    preview; ``steps`` is the host's "Sampling steps" slider (its value is an input of the preview)."""
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
        preview_parts = None
        if preview is not None:
            image = gr.Image(
                value=None,
                label="Plan preview: which LoRA each layer uses at each step",
                type="pil",
                interactive=False,
                show_label=False,  # gradio floats the label over the picture's own title
                elem_id=elem_id(tab, "preview"),
            )
            info = gr.Markdown(value=PICK_HINT, elem_id=elem_id(tab, "preview_info"))
            preview_parts = (image, info)

    def on_refresh() -> tuple[Any, Any]:
        names = lora_choices(refresh_loras())
        return gr.update(choices=names), gr.update(choices=names)

    refresh.click(fn=on_refresh, inputs=[], outputs=[comps["content"], comps["style"]])
    if preview_parts is not None:
        wire_preview(gr, comps, preview_parts, preview, steps)

    ordered = [comps[f.name] for f in FIELDS]
    script.infotext_fields = infotext_fields(comps, list_loras=list_loras, name_for_hash=name_for_hash)
    script.paste_field_names = [str(key) for _, key in script.infotext_fields]
    return ordered


# ---- plan preview ---------------------------------------------------------------------------------------------------
PICK_HINT = "Pick a content LoRA and a style LoRA to preview which one each layer uses at each step."


def _gradio_major(gr: Any) -> int:
    try:
        return int(str(getattr(gr, "__version__", "3")).split(".", 1)[0])
    except ValueError:
        return 3


def wire_preview(gr: Any, comps: dict[str, Any], outputs: tuple[Any, Any], preview: Callable[..., Any], steps: Any):
    """Every control the plan depends on (and the steps slider) redraws the preview on change. The handler runs in
    the queue's worker threads (gradio 3.41 and 4), so scoring a new pair never blocks the UI or other tabs; scoring
    progress shows on the preview image (``gr.Progress``)."""
    from klora_ext.webui.preview import INPUTS

    triggers = [comps[name] for name in INPUTS] + ([steps] if steps is not None else [])
    if steps is None:  # no steps slider found: a fixed input keeps the handler's signature (preview says 20)
        steps = gr.State(value=None)
    inputs = [comps[name] for name in INPUTS] + [steps]

    # Explicit positional parameters: gradio (3.41 and 4) finds ``gr.Progress`` only among the positional ones.
    def on_change(
        content: Any,
        style: Any,
        alpha: Any,
        beta: Any,
        gamma_mode: Any,
        gamma: Any,
        schedule: Any,
        clock: Any,
        scope: Any,
        k_multiplier: Any,
        method: Any,
        step_value: Any,
        progress: Any = gr.Progress(),  # noqa: B008 - gradio's idiom
    ) -> tuple[Any, str]:
        raw = (content, style, alpha, beta, gamma_mode, gamma, schedule, clock, scope, k_multiplier, method)
        values = dict(zip(INPUTS, raw))

        def report(i: int, n: int, layer_id: str) -> None:
            if n:
                progress((i, n), desc=f"K-LoRA: scoring layer {i}/{n} (once per LoRA pair)")

        result = preview(values, step_value, report)
        return result.image, result.text

    gradio4 = _gradio_major(gr) >= 4
    # gradio 4: a change arriving while the last one runs is queued, the latest wins ("always_last").
    options: dict[str, Any] = {"show_progress": "full", "trigger_mode": "always_last"} if gradio4 else {}
    for component in triggers:
        try:
            event = component.change(fn=on_change, inputs=inputs, outputs=list(outputs), **options)
            if not gradio4:
                # gradio 3.41's page drops a change while the previous one of the same control is still running
                # (typing a LoRA name, dragging a slider): the picture would stay on a stale value. A follow-up
                # step reads the controls again when the call ends and redraws from the cached scores.
                event.then(fn=on_change, inputs=inputs, outputs=list(outputs), show_progress=False)
        except Exception as exc:  # noqa: BLE001 - the preview is optional; the accordion must still build
            logger.warning("could not wire the plan preview (%s)", exc)
            return None
    return on_change


# ---- infotext paste-back and "Send to" ---------------------------------------------------------------------------
class PasteKey(str):
    """An infotext label that is also the paste function. The WebUI's "Send to img2img/inpaint" copies the script
    controls whose infotext_fields target is a *label* listed in ``paste_field_names`` (``name in
    paste_field_names``), while pasting text calls a *callable* target (``callable(key)``; ``PasteField`` takes a
    str as its label and a callable as its function). Being both, every K-LoRA control is carried by "Send to" and
    still pasted through the validated args model."""

    fn: Callable[[dict[str, Any]], Any]

    def __new__(cls, label: str, fn: Callable[[dict[str, Any]], Any]) -> PasteKey:
        obj = super().__new__(cls, label)
        obj.fn = fn
        return obj

    def __call__(self, params: dict[str, Any]) -> Any:
        return self.fn(params)


SHOW_MAP_KEY = "K-LoRA show map"  # only for "Send to": the infotext never carries it


def _warn(message: str) -> None:
    logger.warning(message)
    try:
        import gradio as gr

        gr.Warning(f"[K-LoRA] {message}")  # a toast in the browser when called from the paste event
    except Exception:  # noqa: BLE001 - a missing toast must never fail the paste
        pass


class PasteParser:
    """Parses a pasted infotext once for all K-LoRA controls (each control's getter asks) and warns once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._params: Any = None
        self._result: tuple[bool, KLoraArgs | None] = (False, None)

    def __call__(self, params: dict[str, Any]) -> tuple[bool, KLoraArgs | None]:
        """(K-LoRA present, parsed args or None when present but unusable)."""
        with self._lock:
            if params is self._params:
                return self._result
            present = "K-LoRA" in params
            args = None
            if present:
                try:
                    args = KLoraArgs.from_infotext(params)
                except KLoraError as exc:
                    reason = str(exc).removeprefix("[K-LoRA] ")
                    _warn(f"the pasted K-LoRA settings were not applied (no control changed): {reason}")
            self._params, self._result = params, (present, args)
            return self._result


def parse_pasted(params: dict[str, Any]) -> KLoraArgs | None:
    """KLoraArgs from parsed infotext (None when K-LoRA was not used or the values are unreadable)."""
    return PasteParser()(params)[1]


def _getter(
    name: str,
    parser: PasteParser,
    list_loras: Callable[[], list[str]] | None = None,
    name_for_hash: Callable[[str], str | None] | None = None,
) -> Callable[[dict[str, Any]], Any]:
    def get(params: dict[str, Any]) -> Any:
        present, args = parser(params)
        if name == "enabled":
            return False if not present else (True if args is not None else None)
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
    """(component, key) pairs, one per control, each key a ``PasteKey``: pasting a K-LoRA infotext sets every
    control (fields left out of the short infotext get their defaults); one that cannot be parsed changes nothing
    and says why once; one without K-LoRA turns K-LoRA off and leaves the rest alone. "Send to" copies them all."""
    parser = PasteParser()
    out: list[tuple[Any, Any]] = []
    for field in FIELDS:
        if field.infotext:
            key = PasteKey(field.infotext, _getter(field.name, parser, list_loras, name_for_hash))
        else:
            key = PasteKey(SHOW_MAP_KEY if field.name == "show_map" else f"K-LoRA {field.name}", lambda params: None)
        out.append((comps[field.name], key))
    return out
