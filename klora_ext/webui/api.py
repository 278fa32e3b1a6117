"""Small read-only HTTP endpoints (mounted on the WebUI's FastAPI app in ``on_app_started``).

* ``GET /klora/v1/version`` - extension version, infotext version, the host adapter in use (or why K-LoRA is off).
* ``GET /klora/v1/schema``  - the argument model: positional order for ``alwayson_scripts``, kinds, defaults,
  ranges, choices, infotext keys, plus example payloads for both argument forms.
* ``GET /klora/v1/plan/last`` - the plan JSON (KLORA_SPEC §6) of the last K-LoRA generation (404 before the first,
  and 404 naming the reason when the last K-LoRA generation failed or was skipped).
* ``POST /klora/v1/cache/clear`` - forget every cached pair score (memory and disk), e.g. before a cold benchmark.

Generation itself goes through the WebUI's own ``/sdapi/v1/txt2img|img2img`` with
``"alwayson_scripts": {"K-LoRA": {"args": [...]}}`` (positional, UI order) or ``{"args": [{"enabled": true, ...}]}``.
``ArgsValidation`` (an ASGI middleware) checks those K-LoRA arguments before the WebUI queues the job and answers an
invalid payload with HTTP 422 naming the field: the WebUI itself swallows exceptions raised in a script's
``process()``, so without it a bad payload could only come back as a 200 with no image.
"""

from __future__ import annotations

import importlib
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
    last_error: Callable[[], str | None] | None = None,
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

            error = last_error() if last_error is not None else None
            raise HTTPException(status_code=404, detail=error or "no K-LoRA generation yet")
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


def payload_error(body: bytes, *, parse_infotext: Callable[[str], Mapping[str, Any]] | None = None) -> str | None:
    """The [K-LoRA] message for an invalid K-LoRA part of a txt2img/img2img JSON body, else None. Never raises:
    whatever JSON a client sends is answered (422 or passed on), never a 500.

    Only what can be judged without the host: types, ranges, unknown keys, and an enabled K-LoRA without two
    different LoRAs; a disabled K-LoRA is not checked beyond its "enabled" value. Unknown LoRA names are reported
    at generation time. Bodies that are not JSON objects are left to the WebUI's own validation. K-LoRA settings
    in the request's ``infotext`` field (when no K-LoRA args are sent) are checked with ``parse_infotext``, by
    default the WebUI's own infotext parser.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested beyond the parser: the WebUI answers that itself
        return None
    if not isinstance(payload, dict):
        return None
    scripts = payload.get("alwayson_scripts")
    ours = (
        [v for k, v in scripts.items() if isinstance(k, str) and k.lower() == SCRIPT_TITLE]
        if isinstance(scripts, Mapping)
        else []
    )
    if not ours:
        infotext = payload.get("infotext")
        return _infotext_error(infotext, parse_infotext) if isinstance(infotext, str) and infotext else None
    entry = ours[0]
    args = entry.get("args", []) if isinstance(entry, Mapping) else entry
    if not isinstance(args, list):
        return "[K-LoRA] alwayson_scripts.K-LoRA.args must be a list (positional values, or one object)"
    try:
        if not KLoraArgs.enabled_in(args):
            return None
        KLoraArgs.from_script_args(args).check_runnable()
    except KLoraError as exc:
        return str(exc)
    return None


def _host_infotext_parser() -> Callable[[str], Mapping[str, Any]] | None:
    for name in ("modules.infotext_utils", "modules.generation_parameters_copypaste"):  # v1.8+, then older
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parse = getattr(module, "parse_generation_parameters", None)
        if callable(parse):
            return parse
    return None


def _infotext_error(infotext: str, parse: Callable[[str], Mapping[str, Any]] | None) -> str | None:
    """The API maps an infotext's K-LoRA values onto the UI controls one by one; a value that does not parse would
    silently be dropped there (and the run fail later with a misleading "no LoRAs chosen"): say what is wrong."""
    parse = parse or _host_infotext_parser()
    if parse is None:
        return None
    try:
        params = parse(infotext)
    except Exception:  # noqa: BLE001 - the host parser's problem; the WebUI reports it itself
        return None
    if not isinstance(params, Mapping) or "K-LoRA" not in params:
        return None
    try:
        KLoraArgs.from_infotext(params)
    except KLoraError as exc:
        reason = str(exc).removeprefix("[K-LoRA] ")
        return f"[K-LoRA] the request's infotext has a K-LoRA value that cannot be used: {reason}"
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
