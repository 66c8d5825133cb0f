"""HTTP routes of telemetry: `/metrics` (Prometheus) and the live dashboard.

- `GET /metrics`: the Prometheus exposition (see `mcpopt.monitor.prom`); absent when
  `telemetry.prometheus` is false.
- `GET /dashboard`: a static page (`static/dashboard.html`) that polls the data endpoint every
  2 s and draws with Chart.js (MIT; the UMD build is vendored in `static/`, refreshed from
  `node_modules/chart.js` by `scripts/setup`): latency percentiles over time, calls and errors
  per second, cache hit rate, per-server health and breaker state, grades, tokens, alerts.
- `GET /dashboard/data`: `Telemetry.status()` as JSON.
- `GET /dashboard/chart.umd.min.js`: the charting library (no CDN, no build step).

Absent when `telemetry.dashboard` is false.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from mcpopt.monitor.hub import Telemetry

STATIC = Path(__file__).resolve().parent / "static"
CHART_JS = "chart.umd.min.js"


def chart_js_path() -> Path | None:
    """The vendored Chart.js UMD build, else the one in a `node_modules` above the package."""
    vendored = STATIC / CHART_JS
    if vendored.is_file():
        return vendored
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "node_modules" / "chart.js" / "dist" / CHART_JS
        if candidate.is_file():
            return candidate
    return None


def routes(hub: Telemetry) -> list[Any]:
    """Starlette `Route`s to append to the HTTP front's `custom_starlette_routes`."""
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    out: list[Any] = []
    if hub.prometheus is not None:

        async def metrics(request: Request) -> Response:
            from mcpopt.monitor.exposition import CONTENT_TYPE  # prometheus-client: loaded at the first scrape

            hub.process_pending()
            return Response(hub.prometheus.render(), media_type=CONTENT_TYPE)

        out.append(Route("/metrics", metrics, methods=["GET"]))
    if not hub.settings.dashboard:
        return out

    async def page(request: Request) -> Response:
        return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))

    async def data(request: Request) -> Response:
        hub.process_pending()
        return Response(
            orjson.dumps(hub.status(), option=orjson.OPT_NON_STR_KEYS),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def chart(request: Request) -> Response:
        path = chart_js_path()
        if path is None:
            return PlainTextResponse("Chart.js is missing: run scripts/setup (npm install chart.js)", status_code=404)
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    out += [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/data", data, methods=["GET"]),
        Route(f"/dashboard/{CHART_JS}", chart, methods=["GET"]),
    ]
    return out
