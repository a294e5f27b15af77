"""Standard Webhooks signatures: what a receiver checks with any of the spec's libraries.

Headers: `webhook-id`, `webhook-timestamp` (the attempt's time, Unix seconds) and
`webhook-signature`: `v1,<base64 HMAC-SHA256 over "id.timestamp.body">`, one per configured
secret, separated by spaces, so a secret can be rotated without a gap (receivers accept any
signature made with a secret they know).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Iterable


def parse_secret(text: str) -> bytes:
    """A secret as the spec writes it, `whsec_<base64>` (the prefix optional): its key bytes."""
    encoded = text.strip().removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)  # padding optional
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret must be whsec_ followed by base64") from exc
    if len(key) < 16:
        raise ValueError("a webhook secret must hold at least 16 bytes (24 to 64 are usual)")
    return key


def sign(keys: Iterable[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    content = f"{message_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode() for key in keys
    )
