"""Where the settings used to live; :mod:`worker.settings` is the one definition now."""

from __future__ import annotations

from worker.errors import ConfigError
from worker.settings import MAX_MESSAGE_BYTES, Settings

__all__ = ["MAX_MESSAGE_BYTES", "ConfigError", "Settings"]
