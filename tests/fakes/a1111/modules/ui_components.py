"""Fake ``modules.ui_components`` (InputAccordion is a hidden checkbox driving an accordion)."""

import gradio as gr


class ToolButton(gr.Button):
    pass


class FormRow(gr.Row):
    pass


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or "input-accordion"
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(kwargs.get("label", "Accordion"), open=value, elem_id=self.accordion_id)

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)
        return False
