"""`multipart/*` bodies (RFC 2046 §5.1, RFC 7578): the boundary parameter and the parts of a whole body."""

from __future__ import annotations

from collections.abc import Iterator

HeaderList = list[tuple[bytes, bytes]]


def media_type(headers: HeaderList | tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The Content-Type value as sent (stripped; its boundary is case-sensitive), b"" when
    absent. Compare the type itself lower-cased."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.strip()
    return b""


def boundary(content_type: bytes) -> bytes | None:
    """The `boundary` parameter of a multipart Content-Type, None when missing."""
    for param in content_type.split(b";")[1:]:
        key, _, value = param.strip().partition(b"=")
        if key.strip().lower() == b"boundary" and value:
            return value.strip().strip(b'"')
    return None


def parts(body: bytes, delimiter: bytes) -> Iterator[tuple[HeaderList, bytes]]:
    """(headers, content) of each part of a whole multipart body; the preamble and epilogue
    are skipped, a body without the closing delimiter ends at its last part."""
    marker = b"--" + delimiter
    for chunk in body.split(marker)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = chunk.partition(b"\n\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        elif content.endswith(b"\n"):
            content = content[:-1]
        headers = []
        for line in head.splitlines():
            name, colon, value = line.partition(b":")
            if colon:
                headers.append((name.strip(), value.strip()))
        yield headers, content


def disposition_params(value: bytes) -> dict[str, str]:
    """The parameters of a Content-Disposition value (`name`, `filename`), unquoted."""
    found = {}
    for param in value.split(b";")[1:]:
        key, _, raw = param.strip().partition(b"=")
        text = raw.strip()
        if text[:1] == b'"' and text[-1:] == b'"':
            text = text[1:-1].replace(b'\\"', b'"')
        found[key.strip().lower().decode("latin-1")] = text.decode("utf-8", "replace")
    return found
