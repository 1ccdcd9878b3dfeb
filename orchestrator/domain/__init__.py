"""The domain: the scheduling context, decisions, jobs and errors, as plain values. Pure.

Imports nothing from the rest of the project and no I/O library; every other layer
speaks in these types (docs/ARCHITECTURE.md, "Layers")."""
