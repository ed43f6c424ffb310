"""scanpy's logging functions (``scanpy.logging``), without importing scanpy before it is needed.

``from scanpy import logging`` imports all of scanpy, and with it scikit-learn: about a second
of a 12 s ``gpusc run`` that uses neither. While scanpy has not been imported, its settings are
its defaults (verbosity "warning"), under which ``info``, ``hint`` and ``debug`` print nothing:
those calls then only return the time, as scanpy's do. Once scanpy is imported (a user who
sets ``sc.settings.verbosity``, or tests capturing its log), every call goes to scanpy's own
function; ``warning`` and ``error`` always do (importing scanpy first), so their output is
scanpy's.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime


def _forward(level: str, msg: str, kwargs: dict) -> datetime:
    if "scanpy" not in sys.modules and level not in ("warning", "error"):
        return datetime.now(UTC)  # silent at scanpy's default verbosity
    from scanpy import logging

    return getattr(logging, level)(msg, **kwargs)


def error(msg: str, **kwargs) -> datetime:
    return _forward("error", msg, kwargs)


def warning(msg: str, **kwargs) -> datetime:
    return _forward("warning", msg, kwargs)


def info(msg: str, **kwargs) -> datetime:
    return _forward("info", msg, kwargs)


def hint(msg: str, **kwargs) -> datetime:
    return _forward("hint", msg, kwargs)


def debug(msg: str, **kwargs) -> datetime:
    return _forward("debug", msg, kwargs)
