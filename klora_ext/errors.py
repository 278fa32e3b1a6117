"""The one exception type users can see."""

from __future__ import annotations


class KLoraError(ValueError):
    """A user-facing problem; the message starts with "[K-LoRA]" and says what to change."""

    def __init__(self, message: str) -> None:
        if not message.startswith("[K-LoRA]"):
            message = f"[K-LoRA] {message}"
        super().__init__(message)
