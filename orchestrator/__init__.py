"""orchestratord: a programmable scheduler for LLM-inference orchestration.

Kept import-free on purpose: sandbox workers import `orchestrator.sandbox.limits` and
`orchestrator._proto` and must not pull in the core. The packages and the direction
of their imports are in docs/ARCHITECTURE.md.
"""
