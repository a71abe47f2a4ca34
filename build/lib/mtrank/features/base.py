"""The two bases every room shares: one strict config model and one user-facing error.

They sit in the lowest layer (features imports nothing of mtrank), so models, pipeline and jobs
all derive from the same classes and the CLI needs to know a single error type.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class StrictConfig(BaseModel):
    """Configs are data checked at load: unknown keys are errors, a boolean is not a number, and a
    loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data):
        """YAML reads `true`/`yes` as booleans and Python's bool is an int: without this check
        `batch_size: true` would silently train with batch size 1."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                key = field.alias if field.alias and field.alias in data else name
                if isinstance(data.get(key), bool) and _numeric(field.annotation):
                    raise ValueError(f"{key}: expected a number, got the boolean {data[key]!r}")
        return data


class MtrankError(Exception):
    """A failure the user can act on (bad input, config, state, environment): the CLI prints its
    message as one line and exits 2, without a traceback."""


def _numeric(annotation) -> bool:
    """int / float, possibly Optional or Annotated (not bool)."""
    import typing

    args = typing.get_args(annotation)
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in args if a is not type(None)) if args else False




FAILPOINT_ENV = "MTRANK_FAILPOINT"


def failpoint(name: str) -> None:
    """Die here with SIGKILL when $MTRANK_FAILPOINT names this point: how the fault-matrix tests stop a
    job at an exact stage (a kill -9 runs no cleanup, like a lost machine). A no-op otherwise."""
    import os

    if os.environ.get(FAILPOINT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
