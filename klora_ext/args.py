"""The one validated argument model, shared by the UI, the HTTP API, infotext and XYZ axes.

UI order of the fields == API positional order == ``FIELDS`` order. Never reorder; append new fields at the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from klora_ext.errors import KLoraError

INFOTEXT_VERSION = "v1"

METHODS = ("k-lora", "fixed", "random", "content-only", "style-only", "merge")
SCHEDULES = ("linear", "s*")
CLOCKS = ("step", "reference", "reference-literal")  # reference*: the authors' per-call counter (plan.py)
SCOPES = ("all", "attention")
GAMMA_MODES = ("auto-mean", "auto-sum", "manual")
TE_POLICIES = ("both", "content", "style", "none")
HIRES_POLICIES = ("restart", "continue", "keep")

# Friendly spellings accepted from the API, XYZ cells and infotext.
_ALIASES = {
    "scope": {"all shared layers": "all", "all shared": "all", "shared": "all", "attn": "attention"},
    "method": {"klora": "k-lora", "k_lora": "k-lora", "content": "content-only", "style": "style-only"},
    "schedule": {"s_star": "s*", "sstar": "s*"},
    "hires": {"restart schedule": "restart", "continue by noise level": "continue", "keep final choices": "keep"},
    "te_policy": {"off": "none"},
}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "bool" | "str" | "float" | "choice"
    default: Any
    label: str  # UI label
    infotext: str | None  # infotext key; None = not written
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: tuple[str, ...] = ()


FIELDS: tuple[Field, ...] = (
    Field("enabled", "bool", False, "Enable K-LoRA", "K-LoRA"),
    Field("content", "str", "", "Content LoRA", "K-LoRA content"),
    Field("content_weight", "float", 1.0, "Content strength", "K-LoRA content weight", -4.0, 4.0),
    Field("style", "str", "", "Style LoRA", "K-LoRA style"),
    Field("style_weight", "float", 1.0, "Style strength", "K-LoRA style weight", -4.0, 4.0),
    Field("alpha", "float", 1.5, "Alpha (scale slope)", "K-LoRA alpha", 0.0, 10.0),
    Field("beta", "float", 0.5, "Beta (scale offset)", "K-LoRA beta", -10.0, 10.0),
    Field("gamma_mode", "choice", "auto-mean", "Gamma mode", "K-LoRA gamma mode", choices=GAMMA_MODES),
    Field("gamma", "float", 1.0, "Gamma (manual)", "K-LoRA gamma", 0.0, 1e6, lo_open=True),
    Field("schedule", "choice", "linear", "Schedule", "K-LoRA schedule", choices=SCHEDULES),
    Field("clock", "choice", "step", "Clock", "K-LoRA clock", choices=CLOCKS),
    Field("scope", "choice", "all", "Scope", "K-LoRA scope", choices=SCOPES),
    Field("k_multiplier", "float", 1.0, "K multiplier", "K-LoRA K mult", 0.0, 64.0, lo_open=True),
    Field("method", "choice", "k-lora", "Method", "K-LoRA method", choices=METHODS),
    Field("te_policy", "choice", "both", "Text encoder", "K-LoRA TE", choices=TE_POLICIES),
    Field("hires", "choice", "restart", "Hires fix", "K-LoRA hires", choices=HIRES_POLICIES),
    Field("show_map", "bool", False, "Show selection map", None),
)
FIELD_BY_NAME = {f.name: f for f in FIELDS}
FIELD_NAMES = tuple(f.name for f in FIELDS)


def _bad(field: Field, value: Any, what: str) -> KLoraError:
    return KLoraError(f"[K-LoRA] '{field.name}' {what}, got {value!r}")


def coerce(field: Field, value: Any) -> Any:
    """Turn one raw value (UI widget, JSON, infotext string, XYZ cell) into the field's type, or raise."""
    if field.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise _bad(field, value, "must be true or false")
    if field.kind == "str":
        if value is None:
            return ""
        if isinstance(value, (list, tuple)) and len(value) == 1:  # some gradio dropdowns hand back a list
            value = value[0]
        if not isinstance(value, str):
            raise _bad(field, value, "must be a LoRA name (a string)")
        return value.strip()
    if field.kind == "float":
        if isinstance(value, bool):
            raise _bad(field, value, f"must be a number from {field.lo} to {field.hi}")
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float range
            raise _bad(field, value, f"must be a number from {field.lo} to {field.hi}") from None
        low_ok = number > field.lo if field.lo_open else number >= field.lo
        if not math.isfinite(number) or not low_ok or number > field.hi:
            bracket = "(" if field.lo_open else "["
            raise _bad(field, value, f"must be in {bracket}{field.lo}, {field.hi}]")
        return number
    # choice
    if not isinstance(value, str):
        raise _bad(field, value, f"must be one of {', '.join(field.choices)}")
    text = value.strip().lower()
    text = _ALIASES.get(field.name, {}).get(text, text)
    if text not in field.choices:
        raise _bad(field, value, f"must be one of {', '.join(field.choices)}")
    return text


@dataclass(frozen=True)
class KLoraArgs:
    enabled: bool = False
    content: str = ""
    content_weight: float = 1.0
    style: str = ""
    style_weight: float = 1.0
    alpha: float = 1.5
    beta: float = 0.5
    gamma_mode: str = "auto-mean"
    gamma: float = 1.0
    schedule: str = "linear"
    clock: str = "step"
    scope: str = "all"
    k_multiplier: float = 1.0
    method: str = "k-lora"
    te_policy: str = "both"
    hires: str = "restart"
    show_map: bool = False

    def __post_init__(self) -> None:
        for field in FIELDS:
            value = getattr(self, field.name)
            if field.name == "gamma" and self.gamma_mode != "manual":
                # the Gamma box only counts in manual mode: an emptied box (None) or a 0 there must not stop a run
                try:
                    value = coerce(field, value)
                except KLoraError:
                    value = field.default
                object.__setattr__(self, field.name, value)
                continue
            object.__setattr__(self, field.name, coerce(field, value))
        if self.schedule == "s*" and self.alpha <= 0:
            msg = "[K-LoRA] the 's*' schedule takes the scale modulo alpha, so 'alpha' must be > 0"
            raise KLoraError(msg)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KLoraArgs:
        unknown = sorted(set(data) - set(FIELD_NAMES))
        if unknown:
            msg = (
                f"[K-LoRA] unknown argument(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(FIELD_NAMES)}"
            )
            raise KLoraError(msg)
        return cls(**dict(data))

    @classmethod
    def from_positional(cls, values: Sequence[Any]) -> KLoraArgs:
        """UI order. A shorter list keeps defaults for the rest (API callers often send only the first few)."""
        values = list(values)
        if len(values) > len(FIELDS):
            msg = f"[K-LoRA] got {len(values)} positional arguments, at most {len(FIELDS)} ({', '.join(FIELD_NAMES)})"
            raise KLoraError(msg)
        return cls(**dict(zip(FIELD_NAMES, values)))

    @classmethod
    def from_script_args(cls, values: Sequence[Any]) -> KLoraArgs:
        """What a Script's process() receives: either one dict with named keys (the robust API form) followed by
        whatever the UI defaults are, or the positional values in UI order."""
        values = list(values)
        if values and isinstance(values[0], Mapping):
            return cls.from_dict(values[0])
        if any(isinstance(v, Mapping) for v in values):
            msg = "[K-LoRA] a dict argument must be the only (first) K-LoRA argument"
            raise KLoraError(msg)
        return cls.from_positional(values)

    @staticmethod
    def enabled_in(values: Sequence[Any]) -> bool:
        """Only the "enabled" value of Script args (dict or positional form), read without checking the other
        fields: a disabled K-LoRA must never stop a generation over a value it does not use."""
        values = list(values)
        if not values:
            return False
        first = values[0]
        raw = first.get("enabled", False) if isinstance(first, Mapping) else first
        return bool(coerce(FIELD_BY_NAME["enabled"], raw))

    def replace(self, **changes: Any) -> KLoraArgs:
        unknown = sorted(set(changes) - set(FIELD_NAMES))
        if unknown:
            msg = f"[K-LoRA] unknown argument(s) {', '.join(unknown)}"
            raise KLoraError(msg)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_NAMES}

    def to_positional(self) -> list[Any]:
        return [getattr(self, name) for name in FIELD_NAMES]

    # ---- checks before a run ------------------------------------------------------------------------------------
    def check_runnable(self) -> None:
        """Raise the message a user needs when K-LoRA is enabled but can't run as configured."""
        if not self.content and not self.style:
            msg = "[K-LoRA] enabled, but no LoRAs chosen: pick a content LoRA and a style LoRA"
            raise KLoraError(msg)
        if not self.content or not self.style:
            missing = "content" if not self.content else "style"
            msg = f"[K-LoRA] only one LoRA chosen: pick a {missing} LoRA too (K-LoRA fuses two LoRAs)"
            raise KLoraError(msg)
        if self.content == self.style:
            msg = f"[K-LoRA] the same LoRA '{self.content}' is chosen as content and style; pick two different LoRAs"
            raise KLoraError(msg)

    # ---- infotext -----------------------------------------------------------------------------------------------
    def to_infotext(self, content_hash: str | None = None, style_hash: str | None = None) -> dict[str, str]:
        """Short PNG-info entries: the version, both LoRAs (with hashes), then only the values that differ from
        the defaults."""
        if not self.enabled:
            return {}
        out: dict[str, str] = {"K-LoRA": INFOTEXT_VERSION}
        defaults = KLoraArgs()
        for field in FIELDS[1:]:
            if field.infotext is None:
                continue
            value = getattr(self, field.name)
            if field.name not in ("content", "style") and value == getattr(defaults, field.name):
                continue
            if field.name == "gamma" and self.gamma_mode != "manual":
                continue
            out[field.infotext] = _format(value)
        if content_hash:
            out["K-LoRA content hash"] = content_hash
        if style_hash:
            out["K-LoRA style hash"] = style_hash
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> KLoraArgs | None:
        """Parse what ``to_infotext`` wrote (after the host unquoted it); None when K-LoRA was not used."""
        if "K-LoRA" not in params:
            return None
        values: dict[str, Any] = {"enabled": True}
        for field in FIELDS[1:]:
            if field.infotext and field.infotext in params:
                values[field.name] = params[field.infotext]
        return cls(**values)


def infotext_labels() -> dict[str, str]:
    """field name -> infotext key, for hosts wiring paste-back."""
    return {f.name: f.infotext for f in FIELDS if f.infotext}


def _format(value: Any) -> str:
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # short form only when it round-trips exactly
    return str(value)
