"""Fake ``modules.shared``: opts, state, cmd_opts, sd_model."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {
            "lora_functional": False,
            "fp8_storage": "Disable",
            "cache_fp16_weight": False,
            "persistent_cond_cache": True,
        })
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, name):
        data = object.__getattribute__(self, "data")
        if name in data:
            return data[name]
        labels = object.__getattribute__(self, "data_labels")
        if name in labels:
            return labels[name].default
        raise AttributeError(name)

    def __setattr__(self, name, value):
        self.data[name] = value

    def set(self, key, value):
        self.data[key] = value


class State:
    def __init__(self):
        self.begin()

    def begin(self, job=""):
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.job_count = -1

    def interrupt(self):
        self.interrupted = True

    def end(self):
        pass


opts = Options()
state = State()
cmd_opts = SimpleNamespace(lora_dir="", lyco_dir_backcompat="", api=True)
sd_model = None
