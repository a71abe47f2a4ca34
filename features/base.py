"""The two bases every room shares: one strict config model and one user-facing error.

They sit in the lowest layer (features imports nothing of mtrank), so models, pipeline and jobs
all derive from the same classes and the CLI needs to know a single error type.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Configs are data checked at load: unknown keys are errors and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MtrankError(Exception):
    """A failure the user can act on (bad input, config, state, environment): the CLI prints its
    message as one line and exits 2, without a traceback."""
