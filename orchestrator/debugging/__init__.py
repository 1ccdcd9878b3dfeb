"""Trace, profile and the step debugger (issue 18), in diagnostics workers only."""
