"""structlog configuration: the only module that configures logging.

Services log JSON, one event per line; the CLI logs human-readable lines to stderr.
Everything else calls `get_logger()` and logs events with key-value context.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

Format = Literal["json", "console"]


def configure_logging(fmt: Format = "console", level: str = "info") -> None:
    """Configure structlog (and the stdlib root logger) once per process."""
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric_level, stream=sys.stderr, format="%(message)s")


def get_logger(name: str) -> Any:
    """A structlog logger bound to the component `name`."""
    return structlog.get_logger(component=name)
