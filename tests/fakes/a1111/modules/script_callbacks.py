"""Fake ``modules.script_callbacks``: registries and the denoiser params; callback errors are reported, not raised."""

from collections import defaultdict

from modules import errors

callback_map: dict[str, list] = defaultdict(list)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoiserParamsV16:
    """v1.6/1.7: no ``denoiser`` attribute at all."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond


def _add(category, callback, name=None):
    callback_map[category].append((name, callback))


def clear_callbacks():
    callback_map.clear()


def _call(category, *args):
    for _name, callback in list(callback_map[category]):
        try:
            callback(*args)
        except Exception:
            errors.report(f"Error executing callback {category}", exc_info=True)


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def on_app_started(callback, *, name=None):
    _add("app_started", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback, name)


def cfg_denoiser_callback(params):
    _call("cfg_denoiser", params)


def script_unloaded_callback():
    _call("script_unloaded")


def model_loaded_callback(sd_model):
    _call("model_loaded", sd_model)


def ui_settings_callback():
    _call("ui_settings")


def before_ui_callback():
    _call("before_ui")


def app_started_callback(demo, app):
    _call("app_started", demo, app)
