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


def paste(infotext_fields, params):
    """What the UI's paste button does: each (component, key-or-function) becomes an update of that component."""
    updates = []
    for component, key in infotext_fields:
        v = key(params) if callable(key) else params.get(key)
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
