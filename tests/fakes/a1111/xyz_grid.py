"""Fake X/Y/Z plot script module: AxisOption, the axis list, and a one-axis grid run (copy(p) per cell)."""

from copy import copy

from modules import processing, scripts


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.choices = choices
        self.prepare = prepare


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


axis_options = [
    AxisOption("Nothing", str, lambda p, x, xs: None),
    AxisOption("Seed", int, apply_field("seed")),
]


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"


Script.__module__ = "xyz_grid.py"  # the WebUI loads script files under their file name


def run_axis(p, label, values):
    """Values as typed in the plot's textbox; converted by the axis type, confirmed, then one cell per value."""
    opt = next(o for o in axis_options if o.label == label)
    values = [opt.type(v) for v in values]
    if opt.confirm:
        opt.confirm(p, values)
    cells = []
    for value in values:
        pc = copy(p)
        opt.apply(pc, value, values)
        cells.append((pc, processing.process_images(pc)))
    return cells
