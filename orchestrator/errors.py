"""Expected failures: each names the object, the problem and the next command to run."""

from __future__ import annotations


class OrchestratorError(Exception):
    """An expected failure the CLI prints without a traceback."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems = problems or []

    def as_dict(self) -> dict[str, object]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "hint": self.hint,
            "problems": self.problems,
        }


class PlanError(OrchestratorError):
    """The plan file is unreadable or invalid."""


class ConnectionConfigError(OrchestratorError):
    """No database was given, or it cannot be reached."""


class ValidationFailed(OrchestratorError):
    """Live checks of a plan against the database found problems."""


class LockHeld(OrchestratorError):
    """Another orchestrator holds the plan's or a table's advisory lock."""


class StageError(OrchestratorError):
    """A stage cannot run (wrong order, unverified, refused rollback)."""


class LockTimeoutExhausted(OrchestratorError):
    """A DDL could not get its lock within lock_timeout after every retry."""


class IllegalTransition(OrchestratorError):
    """A stage's status change that the state diagram does not allow from its current state
    (another session changed it, or a bug): refused, nothing is overwritten."""
