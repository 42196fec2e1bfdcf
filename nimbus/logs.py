"""Logging setup (loguru): human-readable by default, JSON lines with NIMBUS_LOG_FORMAT=json."""

from __future__ import annotations

import sys

from loguru import logger

from nimbus.config import Settings


def setup(settings: Settings, role: str) -> None:
    logger.remove()
    logger.configure(extra={"role": role, "instance": settings.instance_id})
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level.upper(), serialize=True)
    else:
        logger.add(
            sys.stderr,
            level=settings.log_level.upper(),
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[role]}</cyan> {message}",
        )
