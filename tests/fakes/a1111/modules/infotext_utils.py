"""Fake ``modules.infotext_utils``: quoting of infotext values and the parser of the last infotext line."""

import json
import re

# key: value pairs, a value either JSON-quoted or running up to the next comma
re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text):
    s = str(text)
    if "," in s or "\n" in s or ":" in s:
        return json.dumps(s, ensure_ascii=False)
    return s


def unquote(text):
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_generation_parameters(x):
    res = {}
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        res[k] = v
    res["Prompt"] = prompt
    return res


class PasteField(tuple):
    """Like v1.10 ``PasteField``: a string target is the field's label (matched by "Send to"), a callable target its
    function; a target that is both is both."""

    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


BASE_SEND_NAMES = ["Prompt", "Negative prompt", "Steps", "Face restoration"]


def send_to(source_fields, dest_fields, paste_field_names):
    """What "Send to img2img" does with the script controls (connect_paste_params_buttons, v1.10): the values of the
    source tab's fields whose name is in the list are copied, in order, into the destination's fields with those
    names. Returns [(destination component, value)]."""
    names = BASE_SEND_NAMES + list(paste_field_names)
    inputs = [field for field, name in source_fields if name in names]
    outputs = [field for field, name in dest_fields if name in names]
    return [(out, inp.value) for inp, out in zip(inputs, outputs)]


def api_script_args(fields, inputs, params):
    """What the API's ``apply_infotext`` fills into ``mentioned_script_args`` (v1.10 api.py): index -> value."""
    indexes = {id(v): i for i, v in enumerate(inputs)}
    out = {}
    for entry in fields:
        field = entry if isinstance(entry, PasteField) else PasteField(*entry)
        if id(field.component) not in indexes:
            continue
        value = field.function(params) if field.function else params.get(field.label)
        if value is None:
            continue
        target_type = type(field.component.value)
        if target_type is type(None):
            continue
        if isinstance(value, dict) and value.get("__type__") == "update":
            value = value.get("value")
        if value is not None and not isinstance(value, target_type):
            value = target_type(value)
        out[indexes[id(field.component)]] = value
    return out


def paste(infotext_fields, params):
    """What the UI's paste button does: each (component, key-or-function) becomes an update of that component."""
    from modules import errors

    updates = []
    for component, key in infotext_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key)
        if v is None:
            updates.append((component, None))
            continue
        if isinstance(v, dict) and "__type__" in v:
            updates.append((component, v.get("value")))
            continue
        valtype = type(component.value)  # like the WebUI: converted by the control's current value type
        try:
            if valtype is bool and v == "False":
                v = False
            elif valtype is int:
                v = float(v)
            else:
                v = valtype(v)  # a control whose value is None takes nothing (NoneType(v) fails)
        except Exception:
            v = None
        updates.append((component, v))
    return updates
