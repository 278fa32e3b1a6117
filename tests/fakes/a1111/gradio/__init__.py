"""A minimal stand-in for gradio (tests only): components remember their arguments and event wiring."""

import typing

__version__ = "3.41.2"
created: list = []
warnings_shown: list = []


class Block:
    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.elem_id = kwargs.get("elem_id")
        self.label = kwargs.get("label", args[0] if args and isinstance(args[0], str) else None)
        self.events: list = []
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _event(self, kind, fn=None, inputs=None, outputs=None, **kwargs):
        self.events.append((kind, fn, inputs, outputs))
        return Dependency(self)

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._event("click", fn, inputs, outputs, **kwargs)

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._event("change", fn, inputs, outputs, **kwargs)

    def release(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._event("release", fn, inputs, outputs, **kwargs)


class Dependency:
    """What an event listener returns; ``.then`` adds a follow-up step, recorded on the same block."""

    def __init__(self, block):
        self.block = block

    def then(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self.block._event("then", fn, inputs, outputs, **kwargs)


class Component(Block):
    def __init__(self, value=None, **kwargs):
        super().__init__(**kwargs)
        self.value = value


class Blocks(Block):
    pass


class Row(Block):
    pass


class Column(Block):
    pass


class Group(Block):
    pass


class Accordion(Block):
    def __init__(self, label=None, open=True, **kwargs):
        super().__init__(label=label, **kwargs)
        self.open = open


class Checkbox(Component):
    def __init__(self, value=False, **kwargs):
        super().__init__(value=bool(value), **kwargs)


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, step=None, value=None, **kwargs):
        super().__init__(value=minimum if value is None else value, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Number(Component):
    pass


class Dropdown(Component):
    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(value=value, **kwargs)
        self.choices = list(choices or [])


class Radio(Dropdown):
    pass


class Button(Component):
    pass


class HTML(Component):
    pass


class Markdown(Component):
    pass


class Image(Component):
    pass


class State(Component):
    pass


class Progress:
    """Records what a handler reports: ``progress((i, n), desc=...)``."""

    calls: typing.ClassVar[list] = []

    def __init__(self, track_tqdm=False):
        pass

    def __call__(self, progress=None, desc=None, total=None, unit="steps"):
        Progress.calls.append((progress, desc))


def Warning(message):
    warnings_shown.append(message)


def dropdown_shown_value_gradio4(dropdown):
    """What a fresh page shows in a gradio 4.40 Dropdown (js/dropdown/shared/Dropdown.svelte, initial value): a
    falsy value is replaced by the first choice."""
    if dropdown.value:
        return dropdown.value
    choices = [c[1] if isinstance(c, tuple) else c for c in dropdown.choices]
    return choices[0] if choices else dropdown.value


def update(**kwargs):
    return {"__type__": "update", **kwargs}
