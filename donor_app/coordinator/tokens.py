"""Enrollment tokens: made once and shown once, checked when a donor enrolls.

A token reads ``dtk_<token_id>_<secret>``; the store keeps only the sha256 of the
secret (`TokenRecord`). Pure functions of their inputs (times are passed in as ``now``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta

from donor_app.coordinator.pki import utc_seconds
from donor_app.domain.records import TokenRecord

TOKEN_PREFIX = "dtk"
MIN_TOKEN_TTL = timedelta(minutes=1)
MAX_TOKEN_TTL = timedelta(days=30)
MAX_TOKEN_USES = 100_000
MAX_TOKEN_NOTE = 256
_TOKEN_ID_BYTES = 8
_TOKEN_SECRET_BYTES = 32
_TOKEN = re.compile(
    rf"{TOKEN_PREFIX}_(?P<id>[0-9a-f]{{{2 * _TOKEN_ID_BYTES}}})_(?P<secret>[A-Za-z0-9_-]{{43,128}})"
)


def new_token(now: datetime, ttl: timedelta, uses: int, note: str) -> tuple[str, TokenRecord]:
    """A new enrollment token: the text to hand out (``dtk_<token_id>_<secret>``,
    shown once) and the record to store, which keeps only sha256 of the secret.

    Raises `ValueError` naming the field: `ttl` from 1 minute to 30 days, `uses` from
    1 to 100000, `note` at most 256 characters.
    """
    now = utc_seconds(now, "now")
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"ttl: must be between 1 minute and 30 days, got {ttl}")
    if isinstance(uses, bool) or not 1 <= uses <= MAX_TOKEN_USES:
        raise ValueError(f"uses: must be between 1 and {MAX_TOKEN_USES}, got {uses}")
    if len(note) > MAX_TOKEN_NOTE:
        raise ValueError(f"note: must be at most {MAX_TOKEN_NOTE} characters")
    token_id = secrets.token_hex(_TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(_TOKEN_SECRET_BYTES)
    record = TokenRecord(
        token_id=token_id,
        secret_sha256=_sha256_text(secret),
        created_at=now,
        expires_at=now + ttl,
        uses_left=uses,
        note=note,
    )
    return f"{TOKEN_PREFIX}_{token_id}_{secret}", record


def parse_token(text: str) -> tuple[str, str]:
    """(token_id, sha256 of the secret) of a token as `new_token` makes them.

    Surrounding whitespace is ignored (tokens come from config files and terminals).
    Raises ``ValueError("token: malformed ...")``; messages never contain the token.
    """
    if not isinstance(text, str):
        raise ValueError("token: malformed (not text)")
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"token: malformed (expected {TOKEN_PREFIX}_<id>_<secret>)")
    return match["id"], _sha256_text(match["secret"])


def token_refusal(record: TokenRecord | None, secret_sha256: str, now: datetime) -> str | None:
    """Why a token may not be used now, or None if it may. For the Enroll servicer:
    `record` is what the store holds for the token's id (None: none)."""
    # One answer for "no such id" and "wrong secret": no oracle for valid token ids.
    if record is None or not hmac.compare_digest(record.secret_sha256, secret_sha256):
        return "token: unknown or invalid"
    if record.expires_at <= now:
        return "token: expired"
    if record.uses_left <= 0:
        return "token: already used"
    return None


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()
