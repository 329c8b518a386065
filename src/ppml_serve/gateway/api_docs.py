"""A browsable page of the OpenAPI document (``/v2/docs``): Swagger UI from the
swagger-ui-bundle package, served by the gateway itself (no CDN, nothing fetched elsewhere).

The page's own script is a file too, so the Content-Security-Policy allows scripts from this
origin only."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

_ASSETS = {  # the only files served: no path from the request reaches the file system
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>ppml-serve API</title>
  <link rel="stylesheet" href="/v2/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/v2/docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/v2/docs/swagger-ui-bundle.js"></script>
  <script src="/v2/docs/swagger-ui-standalone-preset.js"></script>
  <script src="/v2/docs/init.js"></script>
</body>
</html>
"""
_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/v2/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
    // calls made from the page carry the key given under "Authorize"
    persistAuthorization: false
  });
};
"""


def _asset_dir() -> Path | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return Path(str(swagger_ui_path))


def docs_routes() -> list[Route]:
    """``/v2/docs`` and its assets."""
    assets = _asset_dir()

    async def page(request: Request) -> Response:
        if assets is None:
            return Response("Swagger UI is not installed (pip install swagger-ui-bundle); the "
                            "document itself is /v2/openapi.json\n", 501,
                            media_type="text/plain")
        return Response(_PAGE, media_type="text/html; charset=utf-8", headers=_HEADERS)

    async def init(request: Request) -> Response:
        return Response(_INIT, media_type="text/javascript", headers=_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if assets is None or name not in _ASSETS:
            return Response('{"error": "no such endpoint"}', 404,
                            media_type="application/json")
        return FileResponse(assets / name, media_type=_ASSETS[name], headers=_HEADERS)

    return [Route("/v2/docs", page), Route("/v2/docs/init.js", init),
            Route("/v2/docs/{name}", asset)]
