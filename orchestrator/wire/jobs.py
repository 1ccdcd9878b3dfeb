"""Job states on the wire: JobState.QUEUED is JOB_STATE_QUEUED (proto/orchestrator.proto),
and so on."""

from __future__ import annotations

from types import MappingProxyType

from orchestrator._proto import orchestrator_pb2 as pb
from orchestrator.domain.jobs import JobState

STATES = MappingProxyType(
    {state: pb.JobState.Value(f"JOB_STATE_{state.name}") for state in JobState}
)
STATE_NAMES = MappingProxyType({v: k for k, v in STATES.items()})
