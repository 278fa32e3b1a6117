"""The one Script class every host uses, the host detection, the denoiser callback, settings and maps.

Error policy
------------
* **Invalid arguments** (a value of the wrong type or out of range, an unknown choice, an unknown key in the dict
  form, too many positional values): the generation stops. ``process()`` logs the ``[K-LoRA]`` message naming the
  field, adds it to the generation's comments (shown under the gallery and in the API's ``info`` JSON), asks the host
  to stop before the first sampling step (``shared.state.interrupt()``, so no image and no grid cell is produced) and
  raises ``KLoraError`` (the WebUI reports the exception from a script hook in its console; it never returns an HTTP
  4xx for it: script hooks run inside the generation, after the request was accepted).
* **Runtime problems** (LoRA not found, the same LoRA twice, only one or no LoRA chosen, a corrupt file, no shared
  layer / a LoRA for another base model, an unsupported host): by default the same stop. With the setting
  "On K-LoRA error" = "continue without K-LoRA", the message is logged and written to the infotext as
  ``K-LoRA skipped: <reason>`` and the generation runs without K-LoRA.
* A failure while switching during sampling (a bug or a host change) is never silent: K-LoRA restores the model,
  logs the error, writes ``K-LoRA skipped`` into the infotext and the generation continues without it.
* The model is never left modified: ``postprocess`` restores; every ``process()`` first restores whatever an aborted
  run left (``disarm(None)``); so does ``on_script_unloaded``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

from modules import script_callbacks, scripts, shared

from klora_ext import __version__, keys
from klora_ext.args import FIELD_BY_NAME, KLoraArgs
from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.webui import run as klrun
from klora_ext.webui.adapter_base import HostAdapter, KLoraRun

TITLE = "K-LoRA"
ON_ERROR_STOP = "stop"
ON_ERROR_CONTINUE = "continue without K-LoRA"
SUPPORTED = (
    "AUTOMATIC1111 WebUI v1.6-v1.10 (with the builtin Lora extension enabled), Forge f2.x, Forge Neo, Forge Classic "
    "and reForge"
)


@dataclass
class HostState:
    adapter: HostAdapter | None = None
    reason: str | None = None  # why K-LoRA is disabled on this host
    detected: bool = False
    last_plan: dict[str, Any] | None = None  # JSON of the last generation's first plan (API /klora/v1/plan/last)
    last_error: str | None = None  # why the last K-LoRA generation has no plan (it failed or was skipped)


STATE = HostState()


# ---- host detection -------------------------------------------------------------------------------------------------
def _forge_present() -> bool:
    for name in ("modules_forge", "ldm_patched"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def detect_adapter() -> tuple[HostAdapter | None, str | None]:
    """(adapter, None) on a supported host, else (None, the message saying why K-LoRA is disabled)."""
    from klora_ext.webui import a1111

    # Every Forge keeps A1111's Lora hook names (old Forge/reForge as inert stubs): never take Forge for A1111.
    if a1111.is_available() and not _forge_present():
        return a1111.A1111Adapter(), None
    if not _forge_present():
        return None, f"[K-LoRA] disabled: this WebUI is not supported. K-LoRA supports {SUPPORTED}."
    try:  # reForge main / Forge Classic (ldm_patched patcher); False on the backend/ Forge line
        ldm_patched = importlib.import_module("klora_ext.webui.ldm_patched")
        if ldm_patched.LdmPatchedAdapter.detect():
            return ldm_patched.LdmPatchedAdapter(), None
    except Exception as exc:  # noqa: BLE001 - must not take the Forge path down with it
        logger.warning("K-LoRA's reForge/Forge Classic support failed to load (%s)", exc)
    try:
        forge = importlib.import_module("klora_ext.webui.forge")
        adapter_class = forge.ForgeAdapter
    except Exception as exc:  # noqa: BLE001 - any import failure disables K-LoRA with the reason
        return None, f"[K-LoRA] Forge detected, but K-LoRA's Forge support failed to load ({exc}); K-LoRA is off"
    try:
        reason = adapter_class.unsupported_reason() if hasattr(adapter_class, "unsupported_reason") else None
        if reason:
            return None, reason
        if hasattr(adapter_class, "detect") and not adapter_class.detect():
            return None, f"[K-LoRA] this Forge build is not supported; K-LoRA is off. K-LoRA supports {SUPPORTED}."
        return adapter_class(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"[K-LoRA] Forge detected, but K-LoRA's Forge support could not start ({exc}); K-LoRA is off"


def get_adapter() -> HostAdapter | None:
    if not STATE.detected:
        STATE.adapter, STATE.reason = detect_adapter()
        STATE.detected = True
        if STATE.reason:
            logger.warning(STATE.reason.removeprefix("[K-LoRA] "))
    return STATE.adapter


def list_loras() -> list[str]:
    adapter = get_adapter()
    try:
        return adapter.list_loras() if adapter is not None else []
    except Exception as exc:  # noqa: BLE001 - the UI must build even if the host's list fails
        logger.warning("could not list LoRAs (%s)", exc)
        return []


def name_for_hash(shorthash: str) -> str | None:
    lookup = getattr(get_adapter(), "name_for_hash", None)
    try:
        return lookup(shorthash) if callable(lookup) else None
    except Exception:  # noqa: BLE001 - a paste helper must never fail the paste
        return None


def _preview(values: dict[str, Any], steps: Any, progress: Any = None) -> Any:
    from klora_ext.webui import preview

    _use_webui_font()
    klrun.score_cache(int(opt("klora_cache_size", 32)))
    # no generation yet (p is None): adapters that map files onto the model take the WebUI's loaded one
    return preview.build(values, steps, adapter=get_adapter(), progress=progress)


def _use_webui_font() -> None:
    """Let the map renderer also find the WebUI's own font (Roboto, next to modules/images.py)."""
    try:
        from modules import paths_internal

        from klora_ext.selection_map import add_font_dir

        add_font_dir(os.path.dirname(paths_internal.roboto_ttf_file))
    except (ImportError, AttributeError):
        pass


def refresh_loras() -> list[str]:
    adapter = get_adapter()
    refresh = getattr(adapter, "refresh", None)
    if callable(refresh):
        try:
            return list(refresh())
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not refresh the LoRA list (%s)", exc)
    return list_loras()


# ---- settings -------------------------------------------------------------------------------------------------------
def opt(name: str, default: Any) -> Any:
    opts = getattr(shared, "opts", None)
    value = getattr(opts, name, None) if opts is not None else None
    return default if value is None else value


def ui_defaults() -> KLoraArgs:
    """The UI's initial values: the args model's defaults with the Settings tab's α, β and "show map"."""
    try:
        return KLoraArgs(
            alpha=opt("klora_alpha", FIELD_BY_NAME["alpha"].default),
            beta=opt("klora_beta", FIELD_BY_NAME["beta"].default),
            show_map=opt("klora_show_map", False),
        )
    except KLoraError as exc:
        logger.warning("ignoring invalid K-LoRA defaults in Settings (%s)", exc)
        return KLoraArgs()


def on_ui_settings() -> None:
    import gradio as gr

    section = ("klora", "K-LoRA")
    alpha, beta = FIELD_BY_NAME["alpha"], FIELD_BY_NAME["beta"]
    options = {
        "klora_alpha": shared.OptionInfo(
            alpha.default,
            "Default alpha (scale slope)",
            gr.Slider,
            {"minimum": alpha.lo, "maximum": alpha.hi, "step": 0.05},
            section=section,
        ),
        "klora_beta": shared.OptionInfo(
            beta.default,
            "Default beta (scale offset)",
            gr.Slider,
            {"minimum": beta.lo, "maximum": beta.hi, "step": 0.05},
            section=section,
        ),
        "klora_show_map": shared.OptionInfo(False, "Show the selection map by default", gr.Checkbox, section=section),
        "klora_save_map": shared.OptionInfo(
            False,
            "Save the selection map (PNG + plan JSON) next to the images when it is shown",
            gr.Checkbox,
            section=section,
        ),
        "klora_cache_size": shared.OptionInfo(
            32,
            "Score cache size (LoRA pairs kept)",
            gr.Slider,
            {"minimum": 1, "maximum": 512, "step": 1},
            section=section,
        ),
        "klora_on_error": shared.OptionInfo(
            ON_ERROR_STOP,
            "On K-LoRA error",
            gr.Radio,
            {"choices": [ON_ERROR_STOP, ON_ERROR_CONTINUE]},
            section=section,
        ),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


# ---- callbacks ------------------------------------------------------------------------------------------------------
def on_cfg_denoiser(params: Any) -> None:
    """Registered once; dispatches every denoiser call to the active adapter (a no-op when nothing is armed)."""
    adapter = STATE.adapter
    run = adapter.run if adapter is not None else None
    if run is None:
        return
    before = run.passes
    try:
        adapter.on_denoiser(params)
    except Exception as exc:  # noqa: BLE001 - the host swallows callback errors; never let one pass silently
        logger.error("switching failed during sampling (%s); K-LoRA is off for the rest of this generation", exc)
        owner = run.owner
        try:
            adapter.disarm(None)
        finally:
            if owner is not None and isinstance(getattr(owner, "extra_generation_params", None), dict):
                owner.extra_generation_params["K-LoRA skipped"] = f"error during sampling: {exc}"
            STATE.last_error = f"[K-LoRA] the last K-LoRA generation failed during sampling: {exc}"
        return
    if run.passes != before and run.controller.plan is not None:
        run.used_plans.append((_pass_kind(run.owner), run.controller.plan))


def _pass_kind(p: Any) -> str:
    if getattr(p, "is_hr_pass", False):
        return "hires"
    return "img2img" if getattr(p, "init_images", None) is not None else "first"


def on_script_unloaded() -> None:
    adapter = STATE.adapter
    if adapter is not None:
        try:
            adapter.disarm(None)
        except Exception as exc:  # noqa: BLE001
            logger.error("could not restore the model on unload (%s)", exc)


def on_model_loaded(sd_model: Any) -> None:
    drop = getattr(STATE.adapter, "drop_caches", None)
    if callable(drop):
        drop()


def on_before_ui() -> None:
    from klora_ext.webui import xyz

    xyz.register(list_loras=list_loras, resolve=_resolve_for_xyz)


def on_app_started(demo: Any, app: Any) -> None:
    from klora_ext.webui import api

    api.mount(app, host_info=host_info, last_plan=lambda: STATE.last_plan, last_error=lambda: STATE.last_error)
    try:
        api.install_validation(app)
    except Exception as exc:  # noqa: BLE001 - without it, bad payloads are still stopped inside process()
        logger.warning("could not add the API argument check (%s); invalid payloads stop at generation time", exc)


def _resolve_for_xyz(name: str) -> None:
    adapter = get_adapter()
    if adapter is not None and name:
        adapter.resolve(name)


def host_info() -> dict[str, Any]:
    adapter = get_adapter()
    return {"host": getattr(adapter, "name", None), "disabled_reason": STATE.reason}


def _register(fn, callback, name: str) -> None:
    try:
        fn(callback, name=name)
    except TypeError:  # v1.6 registration functions take no name
        fn(callback)


def register_callbacks() -> None:
    """Called by scripts/klora.py at every (re)load: the WebUI clears all callbacks before reloading scripts, while
    this module stays imported."""
    _register(script_callbacks.on_cfg_denoiser, on_cfg_denoiser, "klora_cfg_denoiser")
    _register(script_callbacks.on_script_unloaded, on_script_unloaded, "klora_unloaded")
    _register(script_callbacks.on_model_loaded, on_model_loaded, "klora_model_loaded")
    _register(script_callbacks.on_ui_settings, on_ui_settings, "klora_settings")
    _register(script_callbacks.on_before_ui, on_before_ui, "klora_xyz")
    _register(script_callbacks.on_app_started, on_app_started, "klora_api")


# ---- the Script -----------------------------------------------------------------------------------------------------
class Script(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        from klora_ext.webui import ui

        return ui.build(
            self,
            is_img2img,
            list_loras=list_loras,
            refresh_loras=refresh_loras,
            defaults=ui_defaults(),
            name_for_hash=name_for_hash,
            preview=_preview,
            steps=getattr(self, "_klora_steps", None),
        )

    def after_component(self, component: Any, **kwargs: Any) -> None:
        # The host's "Sampling steps" slider (built before the scripts' accordions): an input of the plan preview.
        tab = "img2img" if getattr(self, "is_img2img", False) else "txt2img"
        if (kwargs.get("elem_id") or getattr(component, "elem_id", None)) == f"{tab}_steps":
            self._klora_steps = component

    # -- process ----------------------------------------------------------------------------------------------------
    def process(self, p: Any, *script_args: Any) -> None:
        adapter = get_adapter()
        if adapter is not None:
            adapter.disarm(None)  # whatever an aborted generation left behind
        _own_infotext_params(p)
        try:
            # Only "enabled" is read before we know K-LoRA is on: a disabled K-LoRA never stops a generation over a
            # value it does not use (an emptied number box, an old API client's value).
            overrides = getattr(p, klrun.XYZ_ATTR, None) or {}
            enabled = bool(overrides.get("enabled", KLoraArgs.enabled_in(script_args)))
            if not enabled:
                return
            STATE.last_plan, STATE.last_error = None, "[K-LoRA] the last K-LoRA generation did not finish"
            args = klrun.args_with_overrides(script_args, p)
        except KLoraError as exc:
            STATE.last_error = f"[K-LoRA] the last K-LoRA generation failed: {str(exc).removeprefix('[K-LoRA] ')}"
            _stop(p, exc)
            raise
        if not args.enabled:
            return
        try:
            if adapter is None:
                raise KLoraError(STATE.reason or "[K-LoRA] this WebUI is not supported")
            run = self._arm(p, args, adapter)
        except Exception as exc:
            error = exc if isinstance(exc, KLoraError) else KLoraError(f"[K-LoRA] internal error: {exc!r}")
            if adapter is not None:
                adapter.disarm(None)
            reason = str(error).removeprefix("[K-LoRA] ")
            if opt("klora_on_error", ON_ERROR_STOP) == ON_ERROR_CONTINUE:
                logger.warning("%s; continuing without K-LoRA", reason)
                p.extra_generation_params["K-LoRA skipped"] = reason
                STATE.last_error = f"[K-LoRA] the last K-LoRA generation was skipped: {reason}"
                return
            STATE.last_error = f"[K-LoRA] the last K-LoRA generation failed: {reason}"
            _stop(p, error)
            if error is exc:
                raise
            raise error from exc
        p.extra_generation_params.update(args.to_infotext(run.content.shorthash, run.style.shorthash))
        cached = "cached scores" if run.from_cache else "scored now"
        plan = run.session.first_plan
        flips = sum(plan.flips_per_step().values()) if plan is not None else 0
        logger.info(
            "content '%s' x%g, style '%s' x%g; %d switchable layers, %d switches planned (%s)",
            run.content.alias,
            args.content_weight,
            run.style.alias,
            args.style_weight,
            len(plan.layer_ids) if plan is not None else 0,
            flips,
            cached,
        )

    def _arm(self, p: Any, args: KLoraArgs, adapter: HostAdapter) -> KLoraRun:
        seed = getattr(p, "all_seeds", None) or [getattr(p, "seed", 0)]
        cache_size = int(opt("klora_cache_size", 32))
        klrun.score_cache(cache_size)
        state = getattr(shared, "state", None)

        def progress(i: int, n: int, layer_id: str) -> None:
            if state is not None and n:
                state.textinfo = f"K-LoRA: scoring layer {i}/{n}"

        run = klrun.prepare_run(
            args, adapter, p, steps=int(getattr(p, "steps", 20) or 20), seed=int(seed[0] or 0), progress=progress
        )
        adapter.arm(p, run)
        adapter.run = run
        return run

    # -- during the generation --------------------------------------------------------------------------------------
    def after_extra_networks_activate(self, p: Any, *script_args: Any, **kwargs: Any) -> None:
        adapter = STATE.adapter
        if adapter is not None and adapter.run is not None:
            adapter.on_networks_activated(p)

    def process_before_every_sampling(self, p: Any, *script_args: Any, **kwargs: Any) -> None:
        adapter = STATE.adapter
        if adapter is not None and adapter.run is not None:
            adapter.before_sampling(p, hires=bool(getattr(p, "is_hr_pass", False)))

    def before_hr(self, p: Any, *script_args: Any) -> None:
        adapter = STATE.adapter
        if adapter is not None and adapter.run is not None:
            adapter.before_sampling(p, hires=True)

    # -- end --------------------------------------------------------------------------------------------------------
    def postprocess(self, p: Any, processed: Any, *script_args: Any) -> None:
        adapter = STATE.adapter
        run = adapter.run if adapter is not None else None
        if run is None or run.owner is not p:
            return
        plans = run.used_plans or ([("first", run.session.first_plan)] if run.session.first_plan else [])
        for _, plan in plans:
            run.notes.extend(plan.notes)  # e.g. what the reference clocks ignore, shown like the adapter's notes
        try:
            if plans:
                STATE.last_plan, STATE.last_error = plans[0][1].to_json(), None
            if run.args.show_map and plans:
                add_maps(p, processed, run, plans)
        except Exception as exc:  # noqa: BLE001 - a map problem must not keep the model modified
            logger.error("could not draw the selection map (%s)", exc)
        finally:
            adapter.disarm(p)
        _show_notes(processed, run.notes)


def _show_notes(processed: Any, notes: list[str]) -> None:
    """Put the run's notes (prompt LoRA taken over, layers skipped, ...) under the gallery, not only in the console.
    The host renders ``processed.comments`` after the scripts' postprocess."""
    comments = getattr(processed, "comments", None)
    if not isinstance(comments, str):
        return
    for note in dict.fromkeys(notes):
        line = f"[K-LoRA] {note}"
        if line not in comments:
            comments += f"{line}\n"
    processed.comments = comments


def _own_infotext_params(p: Any) -> None:
    """Give ``p`` its own ``extra_generation_params`` without any K-LoRA entry. The X/Y/Z plot shallow-copies ``p``
    per cell, so all cells (and the plot's own ``p``) share one dict: without this an alpha=1.5 cell would keep the
    previous cell's "K-LoRA alpha: 0.5" (defaults are not written) and an Enabled=False cell "K-LoRA: v1"."""
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        p.extra_generation_params = {k: v for k, v in params.items() if not str(k).startswith("K-LoRA")}


def _stop(p: Any, error: KLoraError) -> None:
    """Stop this generation before its first step, with the message where the user sees it."""
    message = str(error)
    logger.error(message.removeprefix("[K-LoRA] "))
    # The API's `info` JSON carries the infotext params but not the comments: put the message in both.
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params["K-LoRA error"] = message.removeprefix("[K-LoRA] ")
    if hasattr(p, "comment"):
        p.comment(message)
    elif isinstance(getattr(p, "comments", None), dict):
        p.comments[message] = 1
    state = getattr(shared, "state", None)
    if state is not None:
        if hasattr(state, "interrupt"):
            state.interrupt()
        else:
            state.interrupted = True


# ---- selection map --------------------------------------------------------------------------------------------------
def add_maps(p: Any, processed: Any, run: KLoraRun, plans: list[tuple[str, Any]]) -> None:
    from klora_ext.selection_map import render_map

    _use_webui_font()
    seen: set[int] = set()
    for kind, plan in plans:
        if id(plan) in seen:
            continue
        seen.add(id(plan))
        args = run.args
        title = f"K-LoRA selection map ({kind} pass, {plan.steps} steps)"
        lines = [
            f"content: {run.content.alias} x{args.content_weight:g}   style: {run.style.alias} x{args.style_weight:g}",
            f"method {plan.method}  schedule {plan.schedule}  alpha {plan.alpha:g}  beta {plan.beta:g}  "
            f"gamma {plan.gamma:.4g}  clock {plan.clock}  scope {plan.scope}",
        ]
        groups = [keys.layer_group(i) for i in plan.layer_ids]
        image = render_map(plan.roles, plan.layer_ids, groups=groups, title=title, info_lines=lines)
        plan_json = json.dumps(plan.to_json(), separators=(",", ":"))
        text = f"{title}\n" + "\n".join(lines)
        info = getattr(image, "info", None)
        if isinstance(info, dict):
            info["parameters"] = text
            info["klora_plan"] = plan_json  # the API writes string info entries into the PNG
        processed.images.append(image)
        infotexts = getattr(processed, "infotexts", None)
        if isinstance(infotexts, list):
            infotexts.append(text)
        if opt("klora_save_map", False):
            _save_map(p, image, text, plan_json)


def _save_map(p: Any, image: Any, text: str, plan_json: str) -> None:
    try:
        from modules import images
    except ImportError:
        return
    seeds = getattr(p, "all_seeds", None) or [getattr(p, "seed", 0)]
    prompts = getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")]
    outdir = getattr(p, "outpath_samples", None) or "."
    result = images.save_image(image, outdir, "", seeds[0], prompts[0], "png", info=text, p=p, suffix="-klora-map")
    fullfn = result[0] if isinstance(result, tuple) else result
    if isinstance(fullfn, str):
        with open(fullfn.rsplit(".", 1)[0] + ".json", "w", encoding="utf-8") as handle:
            handle.write(plan_json)


__all__ = [
    "STATE",
    "TITLE",
    "HostState",
    "Script",
    "__version__",
    "detect_adapter",
    "get_adapter",
    "register_callbacks",
]
