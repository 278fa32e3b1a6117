"""Standard-library client for the opt-in live tiers (A1111 and Forge share it)."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any


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


def base_payload(steps: int, size: int) -> dict[str, Any]:
    """A small, fixed txt2img request (CPU servers take about 1.5 s per step at 64x64)."""
    return {
        "prompt": "a photo",
        "negative_prompt": "",
        "steps": steps,
        "width": size,
        "height": size,
        "seed": 1234,
        "sampler_name": "Euler",
        "cfg_scale": 5,
        "batch_size": 1,
        "n_iter": 1,
    }


def klora(args: list) -> dict:
    return {"alwayson_scripts": {"K-LoRA": {"args": args}}}


def png_text(b64: str) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        image.load()
        return {k: v for k, v in image.info.items() if isinstance(v, str)}


# ---- checks shared by the A1111 and Forge tiers ---------------------------------------------------------------------
def check_invalid_payload_refused(server: LiveServer, good: dict, content: str) -> None:
    status, body = server.status_of("/sdapi/v1/txt2img", {**server.base, **klora([{**good, "alpha": "fast"}])})
    assert status == 422
    assert body["detail"].startswith("[K-LoRA] 'alpha' must be a number from 0.0 to 10.0")
    payload = {**server.base, **klora([{"enabled": True, "content": content}])}
    status, body = server.status_of("/sdapi/v1/txt2img", payload)
    assert status == 422
    assert "only one LoRA chosen" in body["detail"]


def check_unknown_lora_stops(server: LiveServer, good: dict) -> None:
    # only the host knows its LoRA names: this is judged at generation time, not by the 422 check
    result = server.txt2img(**klora([{**good, "style": "no_such_lora_xyz"}]))
    assert result["images"] == []
    # the info JSON has no comments; the message travels in the infotext params
    info = result["parsed_info"]
    assert "no_such_lora_xyz" in info["extra_generation_params"].get("K-LoRA error", "")
    assert any("K-LoRA error" in text for text in info.get("infotexts", []))


def check_api_infotext_restores_k_lora(server: LiveServer, good: dict) -> None:
    first = server.txt2img(**klora([{**good, "alpha": 2.25, "method": "fixed"}]))
    text = first["parsed_info"]["infotexts"][0]
    assert "K-LoRA alpha: 2.25" in text
    assert "K-LoRA method: fixed" in text
    # the API's `infotext` field alone: prompt, seed, size and the K-LoRA settings all come from the text
    again = server.request("/sdapi/v1/txt2img", {"infotext": text})
    again_text = json.loads(again["info"])["infotexts"][0]
    assert "K-LoRA alpha: 2.25" in again_text
    assert "K-LoRA method: fixed" in again_text
    assert decode(again["images"][0]).tolist() == decode(first["images"][0]).tolist()


def decode(b64: str) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))
