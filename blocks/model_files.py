"""Moved to ``model_parts.files`` (shared with the client); re-exported for old imports."""

from model_parts.files import *  # noqa: F403
