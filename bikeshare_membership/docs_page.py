"""`GET /docs`: Swagger UI over the app's own OpenAPI document, with "Try it out" on.

Swagger UI's files are the ones the flask-swagger-ui wheel ships in its `dist` folder, served by the app
itself under `/docs/swagger-ui-<version>/`: the page fetches nothing from elsewhere, and its
Content-Security-Policy has the browser refuse anything that is not the app's own (scripts, styles, fonts,
images, API calls), inline script included but for the page's one, allowed by its hash. Only the files the
page uses are served (the bundle, its style sheets, the icons): anything else there is a 404 like any
unknown route. Their URL names Swagger UI's version, so a browser keeps them for a year without asking.

flask-swagger-ui's own blueprint is not used: its page runs the standalone layout, whose top bar loads any
URL typed into it, and sends Swagger UI's default validator badge to validator.swagger.io.

Self-contained: `register(app, openapi_path)` adds the page and its files to any Flask app that serves its
OpenAPI document at `openapi_path`.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from pathlib import Path

import flask_swagger_ui
import orjson
from flask import Blueprint, Flask, Response, abort, request, send_from_directory, url_for

DIST = Path(flask_swagger_ui.__file__).parent / "dist"
SWAGGER_UI_VERSION = (DIST / "VERSION").read_text().strip().removeprefix("v")
ASSETS_PATH = f"/docs/swagger-ui-{SWAGGER_UI_VERSION}"
# The files the page uses, by their names in _PAGE.
PAGE_ASSETS = {
    "bundle": "swagger-ui-bundle.js",
    "style": "swagger-ui.css",
    "page_style": "index.css",
    "icon_32": "favicon-32x32.png",
    "icon_16": "favicon-16x16.png",
}
# Their types, set here rather than guessed from the machine's mime.types.
MIMETYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
ASSETS = {name: MIMETYPES[Path(name).suffix] for name in PAGE_ASSETS.values()}
ASSET_MAX_AGE = 365 * 24 * 3600  # the URL changes with the version, so a year is safe

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="{page_style}">
<link rel="stylesheet" href="{style}">
<link rel="icon" type="image/png" sizes="32x32" href="{icon_32}">
<link rel="icon" type="image/png" sizes="16x16" href="{icon_16}">
</head>
<body>
<div id="swagger-ui"><noscript>This page is Swagger UI and needs JavaScript; the OpenAPI document is
<a href="{openapi}">{openapi}</a>.</noscript></div>
<script src="{bundle}"></script>
<script>{script}</script>
</body>
</html>
"""


def _script(openapi_url: str) -> str:
    """Swagger UI's start: the app's document, try-it-out on, no validator badge, no URL from the query."""
    config = {
        "url": openapi_url,
        "dom_id": "#swagger-ui",
        "layout": "BaseLayout",  # no top bar: it would load any URL typed into it
        "deepLinking": True,
        "tryItOutEnabled": True,
        "displayRequestDuration": True,
        "validatorUrl": None,  # else the page fetches a badge from validator.swagger.io
        "queryConfigEnabled": False,  # ?url=... cannot point the page at another document
    }
    literal = orjson.dumps(config).decode().replace("<", "\\u003c")  # no `</script>` can end the script early
    return f"SwaggerUIBundle({{...{literal}, presets: [SwaggerUIBundle.presets.apis]}});"


def _content_security_policy(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' 'sha256-{digest}'",
            "style-src 'self' 'unsafe-inline'",  # Swagger UI styles some elements inline
            "img-src 'self' data:",  # swagger-ui.css draws its icons as data: SVGs
            "font-src 'self'",
            "connect-src 'self'",  # the document and "Try it out": this service only
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def blueprint(openapi_path: str, title: str = "API") -> Blueprint:
    """The page (`GET /docs`) and Swagger UI's files (`GET /docs/swagger-ui-<version>/<file>`), for an app that
    serves its OpenAPI document at `openapi_path`."""
    docs = Blueprint("docs_page", __name__)

    @docs.get("/docs")
    def page() -> Response:
        # Built per request (microseconds) so that the URLs hold when the app is mounted under a prefix.
        openapi_url = request.script_root + openapi_path
        script = _script(openapi_url)
        urls = {key: escape(url_for(".static", filename=name)) for key, name in PAGE_ASSETS.items()}
        html = _PAGE.format_map({**urls, "title": escape(title), "openapi": escape(openapi_url), "script": script})
        response = Response(html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = _content_security_policy(script)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @docs.get(f"{ASSETS_PATH}/<filename>", endpoint="static")
    def asset(filename: str) -> Response:
        """One of Swagger UI's files, cacheable for a year; ETag and Last-Modified answer revalidations."""
        mimetype = ASSETS.get(filename)
        if mimetype is None:
            abort(404)
        response = send_from_directory(DIST, filename, mimetype=mimetype, max_age=ASSET_MAX_AGE)
        response.cache_control.immutable = True
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return docs


def register(app: Flask, openapi_path: str = "/openapi.json", title: str = "API") -> None:
    """Serve Swagger UI at `/docs` on `app`, over the OpenAPI document the app serves at `openapi_path`."""
    app.register_blueprint(blueprint(openapi_path, title))
