"""One error taxonomy: every code has a status at each edge, each error class its code,
and the edges decide by code, never by message."""

from __future__ import annotations

import inspect
from typing import Any, NoReturn

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.api.rpc import errors as rpc_errors
from orchestrator.api.rpc.jobs import JobServicer
from orchestrator.api.web import errors as web_errors
from orchestrator.domain import errors
from orchestrator.domain.errors import ErrorCode, OrchestratorError
from orchestrator.domain.identity import LOCAL_OPERATOR
from orchestrator.policy.parse import PolicyError
from orchestrator.policy.validate import Report, ValidationFailedError


def test_every_code_has_a_grpc_and_an_http_status() -> None:
    assert set(rpc_errors.STATUS) == set(ErrorCode)
    assert set(web_errors.STATUS) == set(ErrorCode)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.ConfigError("x"), ErrorCode.INVALID_ARGUMENT),
        (errors.InvalidRequestError("max_tokens", "too many"), ErrorCode.INVALID_ARGUMENT),
        (PolicyError("p.yaml", 1, 2, "bad"), ErrorCode.INVALID_ARGUMENT),
        (errors.NotFoundError("x"), ErrorCode.NOT_FOUND),
        (errors.PermissionDeniedError("x"), ErrorCode.PERMISSION_DENIED),
        (ValidationFailedError(Report("p", "lua", "0")), ErrorCode.POLICY_REJECTED),
        (errors.SchedulerLoadError("x"), ErrorCode.SCHEDULER_UNLOADABLE),
        (errors.DrainingError("x"), ErrorCode.UNAVAILABLE),
        (errors.QueueFullError("x"), ErrorCode.QUEUE_FULL),
        (errors.UsageError("x"), ErrorCode.USAGE),
        (errors.SandboxUnavailableError("x"), ErrorCode.INTERNAL),
        (errors.PoolError("x"), ErrorCode.INTERNAL),
    ],
)
def test_each_error_class_carries_its_code(error: OrchestratorError, code: ErrorCode) -> None:
    assert error.code == code


def test_every_error_class_of_the_domain_is_in_the_taxonomy() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    project = [c for c in classes if issubclass(c, OrchestratorError)]
    assert all(isinstance(c.code, ErrorCode) for c in project)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


class RefusingFront:
    """A JobService front whose submit fails with the given error."""

    def __init__(self, error: OrchestratorError) -> None:
        self.error = error

    async def submit(self, spec: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.QueueFullError("no room at all"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DrainingError("the queue is full"), grpc.StatusCode.UNAVAILABLE),
        (errors.InvalidRequestError("model", "unknown"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_grpc_status_follows_the_code_not_the_message(
    error: OrchestratorError, status: grpc.StatusCode
) -> None:
    servicer = JobServicer(RefusingFront(error), caller=lambda: LOCAL_OPERATOR)  # type: ignore[arg-type]
    request = pb.SubmitRequest(model="m", prompt="p", max_tokens=1)
    with pytest.raises(Aborted) as aborted:
        await servicer.Submit(request, FakeContext())  # type: ignore[arg-type]
    assert (aborted.value.code, str(aborted.value)) == (status, str(error))


async def test_grpc_request_checks_go_through_the_same_table() -> None:
    servicer = JobServicer(
        RefusingFront(errors.OrchestratorError("unused")), caller=lambda: LOCAL_OPERATOR
    )  # type: ignore[arg-type]
    with pytest.raises(Aborted) as aborted:
        await servicer.List(pb.ListJobsRequest(limit=5000), FakeContext())  # type: ignore[arg-type]
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(aborted.value) == "limit: must be within 1..1000"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.NotFoundError("scheduler version #9 does not exist"), 404),
        (errors.DrainingError("draining"), 503),
        (ValidationFailedError(Report("p", "lua", "0")), 422),
        (errors.SchedulerLoadError("does not load"), 400),
        (errors.OrchestratorError("ours"), 500),
    ],
)
async def test_http_answers_with_the_status_code_and_details_of_the_error(
    error: OrchestratorError, status: int
) -> None:
    async def fail(request: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[web_errors.errors_as_json])
    app.router.add_get("/fail", fail)
    async with (
        TestServer(app) as server,
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/fail")) as response,
    ):
        body = await response.json()
    assert response.status == status
    assert body == {"error": str(error), "code": error.code.value, **error.details()}
    if isinstance(error, ValidationFailedError):
        assert body["report"]["name"] == "p"
