"""`/ui` on the admin listener: a live dashboard, static files shipped in the package.

The page (flexgw/service/static/) polls the admin listener's own `/status` and `/metrics` and
draws them; nothing is fetched from anywhere else (it works offline), and it shows nothing
`/status` does not (policy configuration stays out of it). The files are read once, when the
admin listener starts.
"""

from __future__ import annotations

from importlib.resources import files

from twisted.web.resource import Resource
from twisted.web.server import Request

#: file name -> content type
STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "ui.js": b"text/javascript; charset=utf-8",
    "ui.css": b"text/css; charset=utf-8",
}
#: The page loads only its own files and talks only to its own origin.
POLICY = b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"


class DashboardResource(Resource):
    """`GET /ui` (and `/ui/`): the page; `/ui/ui.js`, `/ui/ui.css`: its script and style."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        folder = files("flexgw.service").joinpath("static")
        self.files = {name: folder.joinpath(name).read_bytes() for name in STATIC}

    def render_GET(self, request: Request) -> bytes:
        """One of the files, or 404."""
        name = b"/".join(request.postpath).decode("latin-1") or "index.html"
        body = self.files.get(name)
        if body is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"Content-Type", STATIC[name])
        request.setHeader(b"Content-Security-Policy", POLICY)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        return body
