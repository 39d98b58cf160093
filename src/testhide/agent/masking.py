"""Secret values never reach a log: each occurrence in a job's output becomes
``***``, also when it is split across reads or batches, and also in its base64
forms (at any of the three alignments it can take inside a longer encoding)."""

from __future__ import annotations

import base64
import math

MASK = b"***"
MIN_SECRET = 3


def _base64_forms(value: bytes) -> set[bytes]:
    """The stable middle of the base64 encoding of any text containing
    ``value``, for each of the three byte alignments."""
    forms = set()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + value + b"\0\0")
        start = math.ceil(4 * shift / 3)
        end = (4 * (shift + len(value))) // 3
        form = encoded[start:end]
        if len(form) >= 4:
            forms.add(form)
    return forms


class SecretMasker:
    """One per output stream of a job."""

    def __init__(self, values: list[str]) -> None:
        patterns: set[bytes] = set()
        for value in values:
            raw = value.encode()
            if len(raw) >= MIN_SECRET:
                patterns.add(raw)
                patterns |= _base64_forms(raw)
        self._patterns = sorted(patterns, key=len, reverse=True)
        self._held = b""

    def _hold_length(self, data: bytes) -> int:
        """Longest suffix of ``data`` that could still become a secret."""
        longest = 0
        for pattern in self._patterns:
            for size in range(min(len(pattern) - 1, len(data)), longest, -1):
                if data.endswith(pattern[:size]):
                    longest = size
                    break
        return longest

    def feed(self, data: bytes) -> bytes:
        if not self._patterns:
            return data
        data = self._held + data
        for pattern in self._patterns:
            data = data.replace(pattern, MASK)
        hold = self._hold_length(data)
        self._held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held
