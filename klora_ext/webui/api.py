"""Small read-only HTTP endpoints (mounted on the WebUI's FastAPI app in ``on_app_started``).

* ``GET /klora/v1/version`` - extension version, infotext version, the host adapter in use (or why K-LoRA is off).
* ``GET /klora/v1/schema``  - the argument model: positional order for ``alwayson_scripts``, kinds, defaults,
  ranges, choices, infotext keys, plus example payloads for both argument forms.
* ``GET /klora/v1/plan/last`` - the plan JSON (KLORA_SPEC §6) of the last K-LoRA generation (404 before the first).
* ``POST /klora/v1/cache/clear`` - forget every cached pair score (memory and disk), e.g. before a cold benchmark.

Generation itself goes through the WebUI's own ``/sdapi/v1/txt2img|img2img`` with
``"alwayson_scripts": {"K-LoRA": {"args": [...]}}`` (positional, UI order) or ``{"args": [{"enabled": true, ...}]}``.
``ArgsValidation`` (an ASGI middleware) checks those K-LoRA arguments before the WebUI queues the job and answers an
invalid payload with HTTP 422 naming the field: the WebUI itself swallows exceptions raised in a script's
``process()``, so without it a bad payload could only come back as a 200 with no image.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klora_ext import __version__
from klora_ext.args import FIELDS, INFOTEXT_VERSION, KLoraArgs
from klora_ext.errors import KLoraError

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


# ---- validation of generation payloads ------------------------------------------------------------------------------
GENERATION_PATHS = frozenset({"/sdapi/v1/txt2img", "/sdapi/v1/img2img"})
SCRIPT_TITLE = "k-lora"


def payload_error(body: bytes) -> str | None:
    """The [K-LoRA] message for an invalid K-LoRA part of a txt2img/img2img JSON body, else None.

    Only what can be judged without the host: types, ranges, unknown keys, and an enabled K-LoRA without two
    different LoRAs. Unknown LoRA names are reported at generation time. Bodies that are not JSON objects are left
    to the WebUI's own validation.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    scripts = payload.get("alwayson_scripts") if isinstance(payload, dict) else None
    if not isinstance(scripts, Mapping):
        return None
    ours = [v for k, v in scripts.items() if isinstance(k, str) and k.lower() == SCRIPT_TITLE]
    if not ours:
        return None
    entry = ours[0]
    args = entry.get("args", []) if isinstance(entry, Mapping) else entry
    if not isinstance(args, list):
        return "[K-LoRA] alwayson_scripts.K-LoRA.args must be a list (positional values, or one object)"
    try:
        parsed = KLoraArgs.from_script_args(args)
        if parsed.enabled:
            parsed.check_runnable()
    except KLoraError as exc:
        return str(exc)
    return None


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ArgsValidation:
    """Pure ASGI middleware: buffers the body of POST txt2img/img2img, answers 422 on invalid K-LoRA args, and
    otherwise replays the body unchanged to the app."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        messages: list[dict[str, Any]] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break  # client went away: let the app see it
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error = payload_error(body)
        if error is not None:
            content = json.dumps({"error": "KLoraError", "detail": error, "errors": error}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
            await send({"type": "http.response.start", "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": content})
            return

        async def replay() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)


def install_validation(app: Any) -> bool:
    """Add ``ArgsValidation`` to a running Starlette/FastAPI app (idempotent). The WebUI adds its own middleware the
    same way after launch: reset the built stack, add, rebuild."""
    # by name: a reloaded module would bring a new class object
    if any(getattr(getattr(m, "cls", None), "__name__", "") == "ArgsValidation" for m in app.user_middleware):
        return False
    app.middleware_stack = None
    app.add_middleware(ArgsValidation)
    app.middleware_stack = app.build_middleware_stack()
    return True
