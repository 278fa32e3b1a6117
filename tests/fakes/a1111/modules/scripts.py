"""Fake ``modules.scripts``: the Script base class and a runner that dispatches hooks like the WebUI's
(each hook gets the script's slice of ``p.script_args``; exceptions are reported and the generation goes on)."""

from collections import namedtuple

from modules import errors

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []


class Script:
    name = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    group = None
    infotext_fields = None
    paste_field_names = None
    api_info = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def after_component(self, component, **kwargs):
        pass


class ScriptRunner:
    def __init__(self, is_img2img=False):
        self.scripts = []
        self.alwayson_scripts = []
        self.inputs = [None]
        self.is_img2img = is_img2img
        self.infotext_fields = []
        self.paste_field_names = []
        self.steps = None

    def _sampler_section(self, script):
        """The "Sampling steps" slider, built (with after_component calls to every script) before the scripts'
        own UIs, like v1.10's sampler section."""
        import gradio as gr

        tab = "img2img" if self.is_img2img else "txt2img"
        if self.steps is None:
            self.steps = gr.Slider(minimum=1, maximum=150, step=1, value=20, elem_id=f"{tab}_steps")
        script.after_component(self.steps, elem_id=f"{tab}_steps", label="Sampling steps")

    def add_script(self, script):
        """Like initialize_scripts + create_script_ui: call ui(), record the arg slice (UI return order)."""
        script.is_img2img = self.is_img2img
        script.is_txt2img = not self.is_img2img
        script.name = script.title().lower()
        visibility = script.show(self.is_img2img)
        script.alwayson = visibility is AlwaysVisible
        self._sampler_section(script)
        controls = script.ui(self.is_img2img) or []
        script.args_from = len(self.inputs)
        self.inputs.extend(controls)
        script.args_to = len(self.inputs)
        self.scripts.append(script)
        if script.alwayson:
            self.alwayson_scripts.append(script)
        if script.infotext_fields:
            self.infotext_fields.extend(script.infotext_fields)
        if script.paste_field_names:
            self.paste_field_names.extend(script.paste_field_names)
        return controls

    def default_args(self):
        """What the API starts from: every control's initial value (position 0: no selectable script)."""
        values = [0]
        for control in self.inputs[1:]:
            values.append(getattr(control, "value", None))
        return values

    def _each(self, hook, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            method = getattr(script, hook)
            if getattr(type(script), hook, None) is getattr(Script, hook, None):
                continue
            try:
                args = p.script_args[script.args_from:script.args_to]
                method(p, *extra, *args, **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._each("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._each("before_hr", p)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)


def basedir():
    return None
