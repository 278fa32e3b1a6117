"""Standard-library client for the opt-in live tiers (A1111 and Forge share it)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from klora_ext.png import read_png_text


class LiveServer:
    def __init__(self, url: str, timeout: float, base: dict[str, Any]) -> None:
        self.url, self.timeout, self.base = url.rstrip("/"), timeout, base

    def _open(self, path: str, payload: dict | None) -> tuple[int, dict]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                return exc.code, json.loads(text or "{}")
            except ValueError:
                return exc.code, {"detail": text[:2000]}

    def status_of(self, path: str, payload: dict) -> tuple[int, dict]:
        return self._open(path, payload)

    def request(self, path: str, payload: dict | None = None) -> dict:
        status, body = self._open(path, payload)
        if status >= 400:
            raise AssertionError(f"{path}: HTTP {status}: {json.dumps(body)[:2000]}")
        return body

    def txt2img(self, **extra: Any) -> dict:
        result = self.request("/sdapi/v1/txt2img", {**self.base, **extra})
        result["parsed_info"] = json.loads(result.get("info") or "{}")
        return result


def klora(args: list) -> dict:
    return {"alwayson_scripts": {"K-LoRA": {"args": args}}}


def png_text(b64: str) -> dict:
    return read_png_text(base64.b64decode(b64))
