"""The service: jobs and their state machine, events, the scheduling loop, applying
decisions, running jobs, scheduler versions, shadow and simulation, behind the thin
`Orchestrator` front (docs/ARCHITECTURE.md, "One cycle")."""
