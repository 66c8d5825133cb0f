"""Private data kept out of the model: tokens for PII and secrets in tool results, restored on the way out.

Opt-in (`gateway.code_mode.private_data`): for the tools listed in `tools`, every string in a
result that code mode hands to the sandbox is scanned for the configured `kinds`; for the
keys listed in `fields`, the whole string value is private. Each private value becomes a
token such as `[EMAIL_1]` -- the same value always the same token within a session -- so the
sandbox, and therefore everything the code prints or returns to the model, holds tokens only.
When the code passes a token to a tool (a whole argument or inside a longer string), the
gateway puts the real value back before the call goes out, if `restore_to` allows that tool.
A token that the session does not know (its mapping died with an earlier session) fails the
call with a clear message rather than sending the token text as data.

The mapping (`TokenVault`) lives in the gateway's memory only, never in stored session state
or telemetry, and dies with the code session (or with the call when sessions are off).

This guards against private values entering the model's context through results; it is not
a data-loss-prevention system: values the patterns do not recognise stay as they are.
Patterns: email (RFC 5322's common form), phone numbers (E.164 and the usual national
layouts, 8-15 digits), payment cards (13-19 digits passing the Luhn check, ISO/IEC 7812),
IBAN (ISO 13616: country, check digits, and a mod-97 check), US SSN (AAA-GG-SSSS with the
SSA's never-issued ranges excluded), IPv4, and secrets (the bearer/key/password forms and
long random-looking strings of `mcpopt.telemetry.privacy`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mcpopt.codemode.sandbox import PrivateDataSettings

LABELS = {
    "email": "EMAIL",
    "phone": "PHONE",
    "card": "CARD",
    "iban": "IBAN",
    "ssn": "SSN",
    "ipv4": "IP",
    "secret": "SECRET",
    "field": "PRIVATE",
}
TOKEN = re.compile(r"\[(EMAIL|PHONE|CARD|IBAN|SSN|IP|SECRET|PRIVATE)_(\d{1,6})\]")
"""What a token looks like (`[EMAIL_1]`)."""

_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(
        r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
    ),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b"),
    "card": re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"),
    "ssn": re.compile(r"(?<!\d)(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\d)"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w])"),
    "ipv4": re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])"),
    "secret": re.compile(
        r"(?i)\b(?:bearer|basic|token)\s+[A-Za-z0-9._~+/=\-]{12,}"
        r"|\b(?:sk|pk|rk|ghp|gho|ghs|github_pat|xox[abpr]|AKIA|ASIA)[A-Za-z0-9_\-]{12,}"
        r"|\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]+?-----END [A-Z ]*PRIVATE KEY-----"
    ),
}
_ORDER = ("secret", "email", "iban", "card", "ssn", "phone", "ipv4")
"""Longer, more specific forms first, so a card number is not taken for a phone number."""


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def _iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def _accept(kind: str, text: str) -> bool:
    if kind == "card":
        digits = re.sub(r"\D", "", text)
        return 13 <= len(digits) <= 19 and _luhn(digits)
    if kind == "iban":
        return _iban_ok(text)
    if kind == "phone":
        digits = re.sub(r"\D", "", text)
        # A date (2025-06-01) or a version (1.2.3) is not a phone number.
        return 8 <= len(digits) <= 15 and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)
    return True


def _matches(patterns: Sequence[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class PrivateDataError(ValueError):
    """A token cannot be restored (unknown in this session, or its tool may not receive it)."""


class TokenVault:
    """Tokens <-> private values of one code session (or one call).

    Args:
        settings: `gateway.code_mode.private_data`.
    """

    def __init__(self, settings: PrivateDataSettings) -> None:
        self.settings = settings
        self._by_value: dict[str, str] = {}
        self._by_token: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._kinds = [k for k in _ORDER if k in settings.kinds]

    def __len__(self) -> int:
        return len(self._by_token)

    def applies_to(self, tool: str) -> bool:
        """Results of `tool` are tokenized (it is in `tools` or has `fields`)."""
        s = self.settings
        return _matches(s.tools, tool) or any(fnmatch.fnmatchcase(tool, p) for p in s.fields)

    def token_for(self, value: str, kind: str) -> str:
        """The token of `value` (a new one the first time)."""
        token = self._by_value.get(value)
        if token is None:
            label = LABELS[kind]
            n = self._counts.get(label, 0) + 1
            self._counts[label] = n
            token = f"[{label}_{n}]"
            self._by_value[value] = token
            self._by_token[token] = value
        return token

    # ---- into the sandbox ---------------------------------------------------------------------
    def tokenize_result(self, tool: str, value: Any) -> Any:
        """`value` (what the sandbox would get from `tool`) with private values replaced by tokens."""
        s = self.settings
        scan = _matches(s.tools, tool)
        keys: set[str] = set()
        for pattern, names in s.fields.items():
            if fnmatch.fnmatchcase(tool, pattern):
                keys.update(names)
        if not scan and not keys:
            return value
        return self._walk(value, scan, keys, 0)

    def _walk(self, value: Any, scan: bool, keys: set[str], depth: int) -> Any:
        if depth > 64:
            return value
        if isinstance(value, str):
            return self.tokenize_text(value) if scan else value
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                if k in keys and isinstance(v, str) and v:
                    out[k] = self.token_for(v, "field")
                elif k in keys and isinstance(v, list) and all(isinstance(x, str) for x in v):
                    out[k] = [self.token_for(x, "field") if x else x for x in v]
                else:
                    out[k] = self._walk(v, scan, keys, depth + 1)
            return out
        if isinstance(value, list):
            return [self._walk(v, scan, keys, depth + 1) for v in value]
        return value

    def tokenize_text(self, text: str) -> str:
        """`text` with every value of the configured kinds replaced by its token."""
        if not text:
            return text
        for value, token in self._by_value.items():  # known values first (also field values)
            if value in text:
                text = text.replace(value, token)
        for kind in self._kinds:
            pattern = _PATTERNS[kind]

            def sub(m: re.Match[str], kind: str = kind) -> str:
                found = m.group(0)
                if TOKEN.fullmatch(found) or not _accept(kind, found):
                    return found
                return self.token_for(found, kind)

            text = pattern.sub(sub, text)
        return text

    def scrub(self, text: str) -> str:
        """`text` (output on its way to the model) with every known private value replaced."""
        for value, token in sorted(self._by_value.items(), key=lambda kv: -len(kv[0])):
            if value in text:
                text = text.replace(value, token)
        return text

    # ---- out of the sandbox -------------------------------------------------------------------
    def restore_arguments(self, tool: str, arguments: Any) -> Any:
        """`arguments` for `tool` with tokens replaced by their values.

        Raises:
            PrivateDataError: a token unknown in this session, or `tool` not in `restore_to`.
        """
        return self._restore(tool, arguments, 0)

    def _restore(self, tool: str, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            if "[" not in value:
                return value
            return TOKEN.sub(lambda m: self._value_of(tool, m.group(0)), value)
        if depth > 64:
            return value
        if isinstance(value, dict):
            return {k: self._restore(tool, v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self._restore(tool, v, depth + 1) for v in value]
        return value

    def _value_of(self, tool: str, token: str) -> str:
        value = self._by_token.get(token)
        if value is None:
            raise PrivateDataError(
                f"private-data token {token} is not known in this code session (its mapping stays in the "
                "gateway and dies with the session that fetched it); fetch the data again"
            )
        if not _matches(self.settings.restore_to, tool):
            raise PrivateDataError(
                f"private data ({token}) may not be sent to {tool} (gateway.code_mode.private_data.restore_to)"
            )
        return value

    def tokens(self) -> Iterable[str]:
        return self._by_token.keys()
