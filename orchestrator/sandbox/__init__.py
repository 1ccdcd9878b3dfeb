"""The parent side of the sandbox: limits, worker processes, warm spares, the fork server.

Kept import-free: sandbox workers import `orchestrator.sandbox.limits` and must not
pull in the core."""
