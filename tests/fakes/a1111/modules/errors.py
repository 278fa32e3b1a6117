"""Like the WebUI: report and carry on (script hooks and callbacks never abort a generation)."""

import traceback

reported: list[str] = []


def report(message, *, exc_info=False):
    text = message
    if exc_info:
        text += "\n" + traceback.format_exc()
    reported.append(text)


def display(e, task):
    reported.append(f"{task}: {e!r}")
