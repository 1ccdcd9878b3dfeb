"""Deciding: the engine that calls a sandboxed scheduler under a deadline, the decision
validator, the circuit breaker, tenant views and arbitration, and shadow mode."""
