"""Redaction of credentials in configuration values before they are logged or put into an error.

Two kinds of secret occur in LMCache configurations: the user-info part of a URL
(``redis://default:PASSWORD@host:6379/0``) and values of keys named like a secret (``password``,
``auth_token``, ``api_key``, ...). :func:`redact_config` hides both in a configuration mapping,
:func:`redact_url` hides user-info in one string and :func:`redact_text` in free text such as a
library error message. Over-redaction is preferred to a leak: whatever stands before the last ``@``
of a URL is treated as user-info.
"""

from __future__ import annotations

import functools
import re
from typing import Any

REDACTED = "***"

# "scheme://" of any URL: redis, rediss, valkey, redis-sentinel, http(s), s3, ... The lookbehind
# starts a match only where a scheme can begin, which keeps the search linear in long text.
_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://")

# Words that make a configuration key a secret when one of them is a word of the key's name.
# Whole words, so that "min_retrieve_tokens" (a count) is not taken for "token".
_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "passphrase", "secret", "secrets", "token", "auth", "authkey",
    "authentication", "authorization", "credential", "credentials", "apikey", "cookie",
})
# Two-word secrets, matched in the key's words joined by "_".
_SECRET_PHRASES = ("api_key", "private_key", "access_key", "secret_key", "session_key", "client_key")
# Every secret name contains one of these: a cheap test that settles most names without splitting them.
_SECRET_FRAGMENTS = ("pass", "pwd", "secret", "token", "auth", "credential", "key", "cookie")

# A query parameter of a URL (?password=..., &auth_token=...), judged by its name like a key.
_QUERY_PARAMETER = re.compile(r"([?&;])([^=&;#?\s]+)=([^&;#\s]*)")

# "name: " / "name=" / "\"name\": " in text (JSON not yet parsed, a message); the value after it is
# hidden when the name is a secret's. Starts only where a name can begin: linear in long text.
_NAME_AND_SEPARATOR = re.compile(r"""(?<![\w.\-])(["']?)([A-Za-z_][\w.\-]*)\1\s*[:=]\s*""")
_UNQUOTED_VALUE_END = re.compile(r"""[\s,;&}\])'"]""")

# Nesting below which values are not inspected but replaced (configurations are at most 32 deep).
_MAX_DEPTH = 64


def _key_words(key: str) -> list:
    """``"redisPassword"`` / ``"REDIS_PASSWORD"`` / ``"redis-password"`` -> ``["redis", "password"]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


def is_secret_key(key: Any) -> bool:
    """True for a key whose value is a secret by its name (case-insensitive, any separator)."""
    if not isinstance(key, str):
        return False
    lowered = key.lower()
    if not any(fragment in lowered for fragment in _SECRET_FRAGMENTS):
        return False
    return _is_secret_name(key)


@functools.lru_cache(maxsize=1024)
def _is_secret_name(key: str) -> bool:
    words = _key_words(key)
    if any(word in _SECRET_WORDS for word in words):
        return True
    joined = "_".join(words)
    return any(phrase in joined for phrase in _SECRET_PHRASES)


def _redact_query(segment: str) -> str:
    return _QUERY_PARAMETER.sub(
        lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if is_secret_key(m.group(2)) else m.group(0), segment)


def _redact_authority(segment: str) -> str:
    """``user:pass@host,host2/0`` -> ``user:***@host,host2/0``; a segment without ``@`` is unchanged.
    The last ``@`` ends the user-info, so a password with an unencoded ``@``, ``/`` or ``,`` is hidden
    whole (at the price of hiding hosts of a list that repeats user-info per host). Secret-named
    query parameters (``?password=...``) are hidden too."""
    segment = _redact_query(segment)
    at = segment.rfind("@")
    if at < 0:
        return segment
    userinfo, rest = segment[:at], segment[at:]
    user, colon, _ = userinfo.partition(":")
    if colon and not any(c in user for c in "/,@?#"):
        return f"{user}:{REDACTED}{rest}"
    return f"{REDACTED}{rest}"


def _value_end(text: str, start: int) -> int:
    """End of the value at ``start``: a quoted string (with backslash escapes) or a bare word."""
    if start < len(text) and text[start] in "\"'":
        quote, index = text[start], start + 1
        while index < len(text) and text[index] != quote and text[index] != "\n":
            index += 2 if text[index] == "\\" else 1
        return min(index + 1, len(text))
    end = _UNQUOTED_VALUE_END.search(text, start)
    return end.start() if end else len(text)


def _redact_named_values(text: str) -> str:
    pieces, position = [], 0
    for match in _NAME_AND_SEPARATOR.finditer(text):
        if match.start() < position or not is_secret_key(match.group(2)):
            continue  # inside a value already hidden, or not a secret (its value is scanned on)
        value_start = match.end()
        value_end = _value_end(text, value_start)
        if value_end == value_start:
            continue
        value = text[value_start:value_end]
        quote = value[0] if len(value) >= 2 and value[0] in "\"'" and value[-1] == value[0] else ""
        pieces.append(text[position:value_start])
        pieces.append(f"{quote}{REDACTED}{quote}")
        position = value_end
    pieces.append(text[position:])
    return "".join(pieces)


_URL_END_IN_VALUE = re.compile(r"\s")
_URL_END_IN_TEXT = re.compile(r"""[\s"'<>()\[\]{}]""")


def _redact_urls(text: str, url_end) -> str:
    """Each URL runs from its scheme to ``url_end`` or the next scheme."""
    if "://" not in text:
        return text
    starts = [match.end() for match in _SCHEME.finditer(text)]
    pieces, position = [], 0
    for index, start in enumerate(starts):
        limit = starts[index + 1] if index + 1 < len(starts) else len(text)
        end = url_end.search(text, start, limit)
        end = end.start() if end else limit
        segment = text[start:end]
        if "@" in segment or "=" in segment:  # else there is nothing to hide
            pieces.append(text[position:start])
            pieces.append(_redact_authority(segment))
            position = end
    pieces.append(text[position:])
    return "".join(pieces)


def redact_url(value: str) -> str:
    """Hides the user-info password of every URL in ``value`` (a configuration value: it may hold
    several URLs separated by commas or spaces): ``redis://user:pass@h`` -> ``redis://user:***@h``,
    ``redis://:pass@h`` -> ``redis://:***@h``, ``redis://token@h`` -> ``redis://***@h``."""
    return _redact_urls(value, _URL_END_IN_VALUE)


def redact_text(text: str) -> str:
    """:func:`redact_url` for free text (a message quoting a URL, where a URL also ends at a quote or
    bracket), and values given by a secret's name: ``password=x``, ``"api_key": "x"``."""
    return _redact_named_values(_redact_urls(text, _URL_END_IN_TEXT))


def redact_value(key: Any, value: Any, max_items: int | None = None) -> Any:
    """``value`` of configuration key ``key`` with its secrets hidden (containers recursively, to
    _MAX_DEPTH levels). With ``max_items``, containers beyond that many values in all are replaced
    by "...": a structure that shares its parts can stand for more values than memory holds."""
    budget = [max_items if max_items is not None else float("inf")]

    def redact(key, value, depth):
        unset = value is None or value is False or (isinstance(value, str) and not value)
        if is_secret_key(key) and not unset:  # an unset secret is shown as unset: nothing to hide
            return REDACTED
        if isinstance(value, str):  # may be JSON text (LMCACHE_EXTRA_CONFIG) that is not parsed yet
            return _redact_named_values(redact_url(value))
        if not isinstance(value, (dict, list, tuple)):
            return value
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0:
            return "..."
        if isinstance(value, dict):
            return {k: redact(k, v, depth + 1) for k, v in value.items()}
        return [redact(None, item, depth + 1) for item in value]

    return redact(key, value, 0)


def redact_config(config: dict) -> dict:
    """A copy of a configuration mapping that is safe to log: URL passwords and secret-named keys'
    values are ``***``; everything else is unchanged."""
    return {key: redact_value(key, value) for key, value in config.items()}
