"""Request path normalisation: one rule, so that routing, policies and the upstream agree.

An upstream that decodes `%2F`, strips `;` parameters (servlet containers read `/..;/` as
`/../`), folds overlong UTF-8 (`%c0%ae` as `.`) or cuts at NUL would serve a path other than
the one the gateway routed and checked. The rule, after Envoy's `normalize_path`,
`merge_slashes` and `path_with_escaped_slashes_action` (the `Configuration.spec.http` keys are
`normalizePath`, `mergeSlashes`, `pathWithEscapedSlashesAction`):

1. Always refused (400): a literal backslash, a malformed `%` escape, an encoded NUL (`%00`),
   overlong UTF-8 (`%c0%ae`, `%e0%80%ae`, ...), and a `.` or `..` segment carrying parameters
   (`/..;/`, `/.;x/`, `/%2e%2e;/`, `/..%3b/`).
2. Encoded slashes and backslashes (`%2F`, `%5C`), by `pathWithEscapedSlashesAction`:
   `rejectRequest` (default, 400); `unescapeAndForward` (they become `/`); `unescapeAndRedirect`
   (307 to the normalised path); `keepUnchanged` (kept, but a path that has a dot segment when
   they are read as `/`, such as `/..%2Fadmin`, is refused).
3. `normalizePath` (default true): escapes of unreserved characters are decoded (`%2e` → `.`,
   `%41` → `A`), other escapes upper-cased (`%3b` → `%3B`), and dot segments removed
   (RFC 3986 §6.2.2 and §5.2.4: `/a/./b/../c` → `/a/c`). When false, any dot segment, literal or
   encoded, is refused (400) and the path is otherwise left as received.
4. `mergeSlashes` (default true): runs of `/` become one (`//admin` → `/admin`).

The result is what routing and policies match and what the upstream receives. `needs_work`
is the one check a path pays when it has none of `%`, `;`, `\\`, `//`, `/.` or a non-ASCII byte.
"""

from __future__ import annotations

import re
from typing import Protocol

import attrs

from flexgw.http.errors import GatewayError, bad_request

ESCAPED_KEEP = "keepUnchanged"
ESCAPED_REJECT = "rejectRequest"
ESCAPED_REDIRECT = "unescapeAndRedirect"
ESCAPED_FORWARD = "unescapeAndForward"
ESCAPED_SLASH_ACTIONS = (ESCAPED_KEEP, ESCAPED_REJECT, ESCAPED_REDIRECT, ESCAPED_FORWARD)

#: A path with none of these is already normal: the hot path's only cost.
needs_work = re.compile(rb"[%;\\\x80-\xff]|/[/.]").search

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
#: Byte sequences that are never UTF-8: overlong forms (C0/C1 leads, E0 80-9F, F0 80-8F) and
#: leads beyond U+10FFFF.
_OVERLONG = re.compile(rb"[\xc0\xc1\xf5-\xff]|\xe0[\x80-\x9f]|\xf0[\x80-\x8f]")

BACKSLASH = bad_request("A backslash is not allowed in the request path")
MALFORMED_ESCAPE = bad_request("Malformed percent-encoding in the request path")
ENCODED_NUL = bad_request("An encoded NUL (%00) is not allowed in the request path")
OVERLONG_UTF8 = bad_request("Overlong or invalid UTF-8 in the request path")
DOT_PARAMETERS = bad_request("A dot segment with parameters (..;) is not allowed in the request path")
ESCAPED_SLASH = bad_request("An encoded slash or backslash is not allowed in the request path")
DOT_SEGMENT = bad_request("Dot segments are not allowed in the request path")


class PathSettings(Protocol):
    """What the normaliser reads (HttpSettings has these fields; PathRules holds them alone)."""

    normalize_path: bool
    merge_slashes: bool
    escaped_slashes: str


@attrs.frozen
class PathRules:
    """The normalisation settings (`Configuration.spec.http`); the defaults are the safe ones."""

    normalize_path: bool = True
    merge_slashes: bool = True
    escaped_slashes: str = ESCAPED_REJECT


DEFAULT_RULES = PathRules()


@attrs.frozen
class Redirect:
    """`unescapeAndRedirect`: the client is sent to the normalised path."""

    path: bytes


_SLASHES = re.compile(rb"/{2,}")
_SLASH_ESCAPES = re.compile(rb"%(?:2F|5C)")


def normalize_path(
    path: bytes, rules: PathSettings = DEFAULT_RULES
) -> bytes | Redirect | GatewayError:
    """The normalised form of a request path (no query), a redirect, or the 400 to answer.

    Returns `path` itself when nothing changes."""
    if b"\\" in path:
        return BACKSLASH
    if not path.isascii() and _OVERLONG.search(path):
        return OVERLONG_UTF8  # raw bytes (llhttp refuses them; an HTTP/2 :path may carry them)
    escaped_slash = False
    view = path  # with the escapes that matter to the checks (`.`, `;`, `/`, `\\`) resolved
    if b"%" in path:
        decoded = _decode(path, rules)
        if isinstance(decoded, GatewayError):
            return decoded
        path, view, escaped_slash = decoded
        if escaped_slash and rules.escaped_slashes == ESCAPED_REJECT:
            return ESCAPED_SLASH
    if b";" in view:
        for segment in view.split(b"/"):
            if b";" in segment and segment.split(b";", 1)[0] in (b".", b".."):
                return DOT_PARAMETERS
    if rules.merge_slashes and b"//" in path:
        path = _SLASHES.sub(b"/", path)
    segments = path.split(b"/")
    if b"." in segments or b".." in segments:
        if not rules.normalize_path:
            return DOT_SEGMENT
        path = _remove_dot_segments(segments)
    elif view is not path and not rules.normalize_path and _has_dot_segment(view):
        return DOT_SEGMENT  # an encoded one (`%2e%2e`), kept as received: refused all the same
    if escaped_slash:
        if rules.escaped_slashes == ESCAPED_KEEP:
            # Kept as received; still, reading them as `/` must not give a dot segment.
            if _has_dot_segment(_SLASH_ESCAPES.sub(b"/", path)):
                return DOT_SEGMENT
        elif rules.escaped_slashes == ESCAPED_REDIRECT:
            return Redirect(path)
    return path


def _has_dot_segment(path: bytes) -> bool:
    segments = path.split(b"/")
    return b"." in segments or b".." in segments


def _decode(path: bytes, rules: PathSettings) -> tuple[bytes, bytes, bool] | GatewayError:
    """Resolve the escapes of `path`: (the form forwarded, the form checked, whether it had an
    encoded slash or backslash)."""
    pieces = path.split(b"%")
    out = [pieces[0]]
    view = [pieces[0]]
    raw = bytearray(pieces[0])  # the bytes the path stands for, to look for overlong UTF-8
    escaped_slash = False
    normalize = rules.normalize_path
    unescape_slashes = rules.escaped_slashes in (ESCAPED_FORWARD, ESCAPED_REDIRECT)
    for piece in pieces[1:]:
        if len(piece) < 2 or piece[0] not in _HEX or piece[1] not in _HEX:
            return MALFORMED_ESCAPE
        byte = int(piece[:2], 16)
        rest = piece[2:]
        raw.append(byte)
        raw += rest
        if byte == 0:
            return ENCODED_NUL
        escape = b"%" + piece[:2].upper() if normalize else b"%" + piece[:2]
        if byte == 0x2F or byte == 0x5C:
            escaped_slash = True
            forwarded = b"/" if unescape_slashes else escape
            checked = b"/"
        elif normalize and byte in _UNRESERVED:
            forwarded = checked = bytes((byte,))
        else:
            forwarded = escape
            checked = b"." if byte == 0x2E else b";" if byte == 0x3B else escape
        out.append(forwarded + rest)
        view.append(checked + rest)
    if _OVERLONG.search(raw):
        return OVERLONG_UTF8
    return b"".join(out), b"".join(view), escaped_slash


def _remove_dot_segments(segments: list[bytes]) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path already split at `/` (segments[0] is empty)."""
    out: list[bytes] = []
    for segment in segments[1:]:
        if segment == b"..":
            if out:
                out.pop()
        elif segment != b".":
            out.append(segment)
    if segments[-1] == b"." or segments[-1] == b"..":
        out.append(b"")  # "/a/b/.." is "/a/": the last segment stays a directory
    return b"/" + b"/".join(out)
