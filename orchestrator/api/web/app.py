"""The HTTP application: the guard and the error table in front of every route."""

from __future__ import annotations

from aiohttp import web

from orchestrator.api.authn import Gatekeeper
from orchestrator.api.web import admin, openai, ui
from orchestrator.api.web.common import ALLOWED_HOSTS, GATE, ORCHESTRATOR
from orchestrator.api.web.errors import errors_as_json
from orchestrator.api.web.guard import allowed_hosts, guard
from orchestrator.service.orchestrator import Orchestrator

# The largest request body (a scheduler source, a simulation request, a chat): aiohttp's
# default, stated here because it is a bound of ours (SECURITY.md); past it, 413.
MAX_BODY = 1024 * 1024


def make_app(orchestrator: Orchestrator, gate: Gatekeeper) -> web.Application:
    # The error table outermost, so that the guard's refusals answer in its terms too.
    app = web.Application(middlewares=[errors_as_json, guard], client_max_size=MAX_BODY)
    app[ORCHESTRATOR] = orchestrator
    app[GATE] = gate
    app[ALLOWED_HOSTS] = allowed_hosts(orchestrator.config)
    ui.add_routes(app)
    admin.add_routes(app)
    openai.add_routes(app)
    return app
