"""Ports of the Go standard-library parsers whose exact behaviour decides what Ollama accepts.

Ollama checks Modelfile PARAMETER values with ``strconv.ParseInt/ParseFloat/ParseBool``,
REQUIRES with ``golang.org/x/mod/semver``, durations with ``time.ParseDuration``, and prints
show-parameters with Go's ``%#v`` string quoting. Python's own ``int()``/``float()`` accept
things Go rejects (``4_096``, ``" 8 "``, ``"infinity "``) and reject things Go accepts (hex
floats with ``p`` exponents), so a linter built on them would disagree with Ollama. Each
function here follows the Go source it names, including its edge cases.
"""

from __future__ import annotations

import math
import re
import struct
from decimal import Decimal, InvalidOperation

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# The smallest magnitude that rounds to +Inf in float32: halfway between the largest finite
# float32 (2^128 - 2^104) and 2^128, i.e. (2^25 - 1) * 2^103. Go reports ErrRange from that
# value up (ties round to even, and the even neighbour is 2^128 = Inf).
_FLOAT32_OVERFLOW_NUM = (1 << 25) - 1
_FLOAT32_OVERFLOW_EXP2 = 103
_FLOAT32_OVERFLOW = Decimal(_FLOAT32_OVERFLOW_NUM << _FLOAT32_OVERFLOW_EXP2)

_BOOL_VALUES = {
    "1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
    "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False,
}

_DEC_FLOAT = re.compile(
    r"(?P<mant>(?:[0-9_]+(?:\.[0-9_]*)?|\.[0-9_]+))(?:[eE](?P<exp>[+-]?[0-9_]+))?"
)
_HEX_FLOAT = re.compile(
    r"0[xX](?P<mant>(?:[0-9a-fA-F_]+(?:\.[0-9a-fA-F_]*)?|\.[0-9a-fA-F_]+))[pP](?P<exp>[+-]?[0-9_]+)"
)


def parse_int(text: str) -> int | None:
    """``strconv.ParseInt(text, 10, 64)``: optional sign, ASCII digits only, int64 range."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if not body or not all("0" <= c <= "9" for c in body):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def parse_bool(text: str) -> bool | None:
    """``strconv.ParseBool``: exactly the twelve spellings Go accepts."""
    return _BOOL_VALUES.get(text)


def _underscore_ok(text: str) -> bool:
    """``strconv.underscoreOK``: underscores only between digits (or after a base prefix)."""
    saw = "^"
    i = 0
    if text[:1] in ("+", "-"):
        text = text[1:]
    hexa = False
    if len(text) >= 2 and text[0] == "0" and text[1].lower() in "box":
        i = 2
        saw = "0"
        hexa = text[1].lower() == "x"
    while i < len(text):
        c = text[i]
        if "0" <= c <= "9" or (hexa and "a" <= c.lower() <= "f"):
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
        i += 1
    return saw != "_"


def _special_float(text: str) -> bool:
    """``strconv.special``: signed inf/infinity and unsigned nan, any letter case."""
    lowered = text.lower()
    if lowered == "nan":
        return True
    if lowered[:1] in ("+", "-"):
        lowered = lowered[1:]
    return lowered in ("inf", "infinity")


def parse_float32(text: str) -> float | None:
    """``strconv.ParseFloat(text, 32)``: Go float-literal syntax, ErrRange on float32 overflow.

    Underflow rounds to zero without an error, as in Go. Returns the float32 value as a Python
    float (which holds every float32 exactly) or None where Go returns an error.
    """
    if _special_float(text):
        return float(text.lower().replace("infinity", "inf"))
    sign = -1 if text[:1] == "-" else 1
    body = text[1:] if text[:1] in ("+", "-") else text
    if "_" in body and not _underscore_ok(text):
        return None
    hex_match = _HEX_FLOAT.fullmatch(body)
    if hex_match:
        return _hex_float32(sign, hex_match.group("mant"), hex_match.group("exp"))
    dec_match = _DEC_FLOAT.fullmatch(body)
    if not dec_match or not any(c.isdigit() for c in dec_match.group("mant")):
        return None
    mantissa = dec_match.group("mant").replace("_", "")
    exponent_text = (dec_match.group("exp") or "0").replace("_", "")
    if not exponent_text.lstrip("+-"):
        return None
    exponent = int(exponent_text)
    whole, _, frac = mantissa.partition(".")
    whole = whole.lstrip("0")
    if whole:
        magnitude_exp = exponent + len(whole)
    elif frac.strip("0"):
        magnitude_exp = exponent - (len(frac) - len(frac.lstrip("0")))
    else:
        return 0.0 * sign
    # The value lies in [10^(magnitude_exp-1), 10^magnitude_exp). Deciding the far cases from
    # the exponent alone keeps Decimal away from exponents it cannot represent ("1e+2^64").
    if magnitude_exp > 40:
        return None
    if magnitude_exp < -50:
        return 0.0 * sign
    try:
        magnitude = Decimal(f"{mantissa}e{exponent}")
    except InvalidOperation:
        return None
    if magnitude >= _FLOAT32_OVERFLOW:
        return None
    return _to_float32(sign * float(magnitude))


def _to_float32(value: float) -> float:
    """Round to the nearest float32, as Go's ``float32(...)`` conversion does (range checked
    by the callers, so packing cannot overflow)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _hex_float32(sign: int, mantissa: str, exponent_text: str) -> float | None:
    mantissa = mantissa.replace("_", "")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    if not digits:
        return 0.0 * sign
    value = int(digits, 16)
    exponent = int(exponent_text.replace("_", "")) - 4 * len(frac)
    # The value lies in [2^(top-1), 2^top); the overflow threshold lies in [2^127, 2^128), so
    # only top == 128 needs an exact comparison, done with integers so nothing is rounded.
    top = value.bit_length() + exponent
    if top > 128:
        return None
    if top == 128:
        shift = exponent - _FLOAT32_OVERFLOW_EXP2
        overflow = (value << shift >= _FLOAT32_OVERFLOW_NUM if shift >= 0
                    else value >= _FLOAT32_OVERFLOW_NUM << -shift)
        if overflow:
            return None
    if top < -160:
        return 0.0 * sign
    # Keep 64 significant bits so float() cannot overflow on a very long mantissa.
    excess = value.bit_length() - 64
    if excess > 0:
        value >>= excess
        exponent += excess
    return _to_float32(sign * math.ldexp(float(value), exponent))


def semver_is_valid(version: str) -> bool:
    """``golang.org/x/mod/semver.IsValid``: ``vMAJOR[.MINOR[.PATCH[-PRE][+BUILD]]]``."""
    if not version or version[0] != "v":
        return False
    rest = version[1:]
    for part in range(3):
        _, rest, ok = _semver_int(rest)
        if not ok:
            return False
        if not rest:
            return True
        if part == 2:
            break
        if rest[0] != ".":
            return False
        rest = rest[1:]
    if rest.startswith("-"):
        end = rest.find("+")
        prerelease = rest[1:] if end < 0 else rest[1:end]
        if not _semver_idents(prerelease, numeric_check=True):
            return False
        rest = "" if end < 0 else rest[end:]
    if rest.startswith("+"):
        if not _semver_idents(rest[1:], numeric_check=False):
            return False
        rest = ""
    return rest == ""


def _semver_int(text: str) -> tuple[str, str, bool]:
    """``parseInt``: digits without a leading zero (unless just "0"), and the rest."""
    i = 0
    while i < len(text) and "0" <= text[i] <= "9":
        i += 1
    if i == 0 or (text[0] == "0" and i != 1):
        return "", text, False
    return text[:i], text[i:], True


def _semver_idents(text: str, *, numeric_check: bool) -> bool:
    idents = text.split(".")
    for ident in idents:
        if not ident or not all(c.isascii() and (c.isalnum() or c == "-") for c in ident):
            return False
        if numeric_check and ident.isdigit() and len(ident) > 1 and ident[0] == "0":
            return False
    return True


_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float | None:
    """``time.ParseDuration`` in seconds: ``[-+]`` then ``number unit`` pairs, or bare ``0``."""
    sign = -1.0 if text[:1] == "-" else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not body:
        return None
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if not match or match.group(1) in ("", "."):
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", '"': '"', "'": "'"}


def go_unquote(text: str) -> str | None:
    """``strconv.Unquote`` for a double-quoted Go string literal (what ``%#v``/``%q`` print)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return None
    body = text[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == '"' or c == "\n":
            return None
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            return None
        kind = body[i + 1]
        if kind in _GO_ESCAPES:
            out += _GO_ESCAPES[kind].encode()
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width is not None:
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                return None
            number = int(digits, 16)
            if kind == "x":
                out.append(number)  # a raw byte, possibly not valid UTF-8 on its own
            else:
                if number > 0x10FFFF or 0xD800 <= number <= 0xDFFF:
                    return None
                out += chr(number).encode()
            i += 2 + width
            continue
        if "0" <= kind <= "7":
            digits = body[i + 1:i + 4]
            if len(digits) != 3 or not all("0" <= d <= "7" for d in digits) or int(digits, 8) > 255:
                return None
            out.append(int(digits, 8))
            i += 4
            continue
        return None
    return out.decode("utf-8", errors="replace")
