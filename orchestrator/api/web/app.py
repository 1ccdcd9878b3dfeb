"""The HTTP application: the guard and the error table in front of every route."""

from __future__ import annotations

from aiohttp import web

from orchestrator.api.web import admin, ui
from orchestrator.api.web.common import ORCHESTRATOR
from orchestrator.api.web.errors import errors_as_json
from orchestrator.api.web.guard import guard
from orchestrator.service.orchestrator import Orchestrator


def make_app(orchestrator: Orchestrator) -> web.Application:
    app = web.Application(middlewares=[guard, errors_as_json])
    app[ORCHESTRATOR] = orchestrator
    ui.add_routes(app)
    admin.add_routes(app)
    return app
