"""The ASGI argument check in front of /sdapi/v1/txt2img|img2img, driven as a plain ASGI app (no server needed)."""

from __future__ import annotations

import asyncio
import json

import pytest

from klora_ext.webui.api import ArgsValidation, install_validation, payload_error

OK = {"enabled": True, "content": "dog", "style": "ink"}


def body(args) -> bytes:
    return json.dumps({"prompt": "x", "alwayson_scripts": {"K-LoRA": {"args": args}}}).encode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([{**OK, "alpha": "fast"}], "'alpha' must be a number from 0.0 to 10.0, got 'fast'"),
        ([{**OK, "alhpa": 1}], "unknown argument(s) 'alhpa'"),
        ([True, "dog", 1.0, "ink", 1.0, 1.5, 0.5, "auto-mean", 1.0, "zigzag"], "'schedule' must be one of"),
        ([{"enabled": True, "content": "dog"}], "only one LoRA chosen"),
        ([{"enabled": True}], "no LoRAs chosen"),
        ([{"enabled": True, "content": "a", "style": "a"}], "the same LoRA 'a'"),
    ],
)
def test_payload_errors_name_the_field(args, message) -> None:
    error = payload_error(body(args))
    assert error is not None and error.startswith("[K-LoRA]") and message in error


@pytest.mark.parametrize(
    "raw",
    [
        body([OK]),
        body([True, "dog", 1.0, "ink"]),
        body([{"enabled": False, "alpha": 3}]),  # disabled: LoRAs may be empty
        json.dumps({"prompt": "x"}).encode(),  # no K-LoRA at all
        json.dumps({"alwayson_scripts": {"ADetailer": {"args": [1, 2]}}}).encode(),
        b"not json",  # left to the WebUI's own 422
        json.dumps([1, 2]).encode(),
    ],
)
def test_valid_or_foreign_payloads_pass(raw) -> None:
    assert payload_error(raw) is None


def test_title_match_is_case_insensitive_like_the_webui() -> None:
    raw = json.dumps({"alwayson_scripts": {"k-lora": {"args": [{"enabled": True}]}}}).encode()
    assert "no LoRAs chosen" in payload_error(raw)


class Recorder:
    """A stand-in downstream app that records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(data)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, path: str, raw: bytes, *, chunks: int = 1, method: str = "POST"):
    pieces = _split(raw, chunks)
    incoming = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
    ]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path}
    asyncio.run(app(scope, receive, send))
    return sent


def _split(raw: bytes, n: int) -> list[bytes]:
    size = max(1, len(raw) // n)
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def test_middleware_answers_422_and_never_reaches_the_app() -> None:
    inner = Recorder()
    sent = call(ArgsValidation(inner), "/sdapi/v1/txt2img", body([{**OK, "beta": 99}]), chunks=3)
    assert sent[0]["status"] == 422
    detail = json.loads(sent[1]["body"])["detail"]
    assert detail.startswith("[K-LoRA] 'beta' must be in [-10.0, 10.0]")
    assert inner.bodies == []


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
def test_middleware_replays_the_body_unchanged(path) -> None:
    inner = Recorder()
    raw = body([OK]) + b" " * 5000
    sent = call(ArgsValidation(inner), path, raw, chunks=4)
    assert sent[0]["status"] == 200
    assert inner.bodies == [raw]


def test_other_routes_are_not_touched() -> None:
    inner = Recorder()
    bad = body([{**OK, "beta": 99}])
    assert call(ArgsValidation(inner), "/sdapi/v1/options", bad)[0]["status"] == 200
    assert call(ArgsValidation(inner), "/sdapi/v1/txt2img", bad, method="GET")[0]["status"] == 200
    assert inner.bodies == [bad, bad]


class FakeApp:
    """The bits of Starlette's app that install_validation uses."""

    def __init__(self) -> None:
        self.user_middleware: list = []
        self.middleware_stack = object()  # already built: the server is running
        self.builds = 0

    def add_middleware(self, cls, **options) -> None:
        if self.middleware_stack is not None:
            raise RuntimeError("Cannot add middleware after an application has started")
        self.user_middleware.insert(0, type("Middleware", (), {"cls": cls})())

    def build_middleware_stack(self):
        self.builds += 1
        return object()


def test_install_is_idempotent_and_rebuilds_the_stack() -> None:
    app = FakeApp()
    assert install_validation(app) is True
    assert install_validation(app) is False
    assert len(app.user_middleware) == 1 and app.builds == 1 and app.middleware_stack is not None


# ---- issue 11: no 500 for any JSON value; a disabled K-LoRA is never refused --------------------------------------
HUGE = 10**400  # json.dumps writes all 401 digits; float() of it raises OverflowError


@pytest.mark.parametrize("name", ["content_weight", "style_weight", "alpha", "beta", "gamma", "k_multiplier"])
@pytest.mark.parametrize("value", [HUGE, -HUGE])
def test_huge_integers_are_a_422_not_a_500(name, value) -> None:
    args = {**OK, "gamma_mode": "manual", name: value}
    error = payload_error(body([args]))
    assert error is not None and error.startswith("[K-LoRA]") and f"'{name}'" in error
    positional = [True, "dog", 1.0, "ink", 1.0, 1.5, 0.5, "manual", 1.0]
    index = ["enabled", "content", "content_weight", "style", "style_weight", "alpha", "beta", "gamma_mode", "gamma"]
    if name in index:
        positional[index.index(name)] = value
        error = payload_error(body(positional))
        assert error is not None and f"'{name}'" in error


JSON_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    HUGE,
    1e308,
    0.5,
    "",
    "x",
    "1e999",
    "nan",
    [],
    [1],
    [[1]],
    {},
    {"a": 1},
    ["dog"],
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_any_json_value_in_any_field_is_answered_never_raised(value) -> None:
    from klora_ext.args import FIELDS

    for field in FIELDS:
        for args in ([{**OK, field.name: value}], [True, "dog", 1.0, "ink", 1.0][: FIELDS.index(field)] + [value]):
            error = payload_error(body(args))  # must not raise
            assert error is None or error.startswith("[K-LoRA]")
    for raw in (body(value), body([value]), json.dumps({"alwayson_scripts": value}).encode()):
        error = payload_error(raw)
        assert error is None or error.startswith("[K-LoRA]")
    raw = json.dumps({"alwayson_scripts": {"K-LoRA": value}}).encode()
    error = payload_error(raw)
    assert error is None or error.startswith("[K-LoRA]")


@pytest.mark.parametrize(
    "args",
    [
        [False, "", 1.0, "", 1.0, 1.5, 0.5, "auto-mean", None],
        [{"enabled": False, "alpha": "fast", "beta": HUGE}],
        [False, "dog", "heavy"],
        [{"enabled": True, "content": "dog", "style": "ink", "gamma": None}],  # gamma only counts in manual mode
        [{"enabled": True, "content": "dog", "style": "ink", "gamma": 0, "gamma_mode": "auto-sum"}],
    ],
)
def test_disabled_or_unused_fields_are_not_checked(args) -> None:
    assert payload_error(body(args)) is None


def test_enabled_itself_must_be_readable() -> None:
    error = payload_error(body([{"enabled": "maybe"}]))
    assert error is not None and "'enabled'" in error
