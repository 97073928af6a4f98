"""Moved to ``model_parts.skeleton`` (shared with the client); re-exported for old imports."""

from model_parts.skeleton import *  # noqa: F403
