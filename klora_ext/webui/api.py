"""Small read-only HTTP endpoints (mounted on the WebUI's FastAPI app in ``on_app_started``).

* ``GET /klora/v1/version`` - extension version, infotext version, the host adapter in use (or why K-LoRA is off).
* ``GET /klora/v1/schema``  - the argument model: positional order for ``alwayson_scripts``, kinds, defaults,
  ranges, choices, infotext keys, plus example payloads for both argument forms.
* ``GET /klora/v1/plan/last`` - the plan JSON (KLORA_SPEC §6) of the last K-LoRA generation (404 before the first).
* ``POST /klora/v1/cache/clear`` - forget every cached pair score (memory and disk), e.g. before a cold benchmark.

Generation itself goes through the WebUI's own ``/sdapi/v1/txt2img|img2img`` with
``"alwayson_scripts": {"K-LoRA": {"args": [...]}}`` (positional, UI order) or ``{"args": [{"enabled": true, ...}]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klora_ext import __version__
from klora_ext.args import FIELDS, INFOTEXT_VERSION, KLoraArgs

PREFIX = "/klora/v1"


def version_payload(host_info: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "sd-webui-k-lora", "version": __version__, "infotext_version": INFOTEXT_VERSION}
    if host_info is not None:
        out.update(host_info())
    return out


def schema_payload() -> dict[str, Any]:
    fields = []
    for index, field in enumerate(FIELDS):
        entry: dict[str, Any] = {
            "index": index,
            "name": field.name,
            "kind": field.kind,
            "default": field.default,
            "label": field.label,
            "infotext": field.infotext,
        }
        if field.kind == "float":
            entry["min"], entry["max"], entry["min_exclusive"] = field.lo, field.hi, field.lo_open
        if field.choices:
            entry["choices"] = list(field.choices)
        fields.append(entry)
    example = KLoraArgs(enabled=True, content="my_subject", style="my_style")
    return {
        "title": "K-LoRA",
        "fields": fields,
        "example_positional": {"alwayson_scripts": {"K-LoRA": {"args": example.to_positional()[:7]}}},
        "example_dict": {
            "alwayson_scripts": {"K-LoRA": {"args": [{"enabled": True, "content": "my_subject", "style": "my_style"}]}}
        },
    }


def mount(
    app: Any,
    *,
    host_info: Callable[[], dict[str, Any]] | None = None,
    last_plan: Callable[[], dict[str, Any] | None] | None = None,
) -> None:
    """Add the routes (idempotent: a UI reload calls this again on the same app)."""
    existing = {getattr(r, "path", None) for r in getattr(app, "routes", [])}

    def version() -> dict[str, Any]:
        return version_payload(host_info)

    def schema() -> dict[str, Any]:
        return schema_payload()

    def plan_last() -> Any:
        plan = last_plan() if last_plan is not None else None
        if plan is None:
            from fastapi import HTTPException

            raise HTTPException(status_code=404, detail="no K-LoRA generation yet")
        return plan

    def cache_clear() -> dict[str, Any]:
        from klora_ext.webui.run import score_cache

        cache = score_cache()
        entries = len(cache)
        cache.clear()
        return {"cleared": entries}

    routes = (
        ("/version", version, "GET"),
        ("/schema", schema, "GET"),
        ("/plan/last", plan_last, "GET"),
        ("/cache/clear", cache_clear, "POST"),
    )
    for path, fn, method in routes:
        if PREFIX + path not in existing:
            app.add_api_route(PREFIX + path, fn, methods=[method])
