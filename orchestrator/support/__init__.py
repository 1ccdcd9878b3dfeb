"""Project-neutral helpers: logging configuration, the clock, asyncio tasks, systemd notify."""
