"""A minimal stand-in for gradio (tests only): components remember their arguments and event wiring."""

created: list = []


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

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self._event("click", fn, inputs, outputs)

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        self._event("change", fn, inputs, outputs)


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


def update(**kwargs):
    return {"__type__": "update", **kwargs}
