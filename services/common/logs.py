"""Logging, configured once per process: level from RALMSPEC_LOG (else the caller's default), one format."""

from __future__ import annotations

import logging

from services.common import env


def configure(default_level: str, prefix: str = "") -> None:
    """`prefix` names the process in every line (a service's role: several log into one terminal)."""
    level = (env.LOG.get() or default_level).upper()
    if level not in logging.getLevelNamesMapping():
        raise SystemExit(f"{env.LOG.name}={level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", force=True)
