"""orchestratord: a programmable scheduler for LLM-inference orchestration.

Kept import-free on purpose: sandbox workers import `orchestrator.limits` and
`orchestrator._proto` and must not pull in the core.
"""
