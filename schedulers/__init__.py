"""Scheduler policies shipped with orchestratord (data, not code).

- platform.lua: the built-in platform scheduler, read-only, and every fallback.
- examples/: the specs' examples, verbatim.
"""
