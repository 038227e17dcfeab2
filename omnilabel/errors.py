"""The one domain exception of omnilabel and its few subclasses.

Library code raises these; only ``omnilabel.cli`` turns them into an exit code and a one-line message.
"""

from __future__ import annotations


class OmnilabelError(Exception):
    """Base of every error omnilabel reports to a user."""


class InputError(OmnilabelError):
    """Bad user input: a malformed COCO file, an unknown category, a missing image, a bad flag.

    Args:
        message: a one-line summary.
        problems: every individual problem found (each names the file, the record and the field).
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class CheckpointError(OmnilabelError):
    """A model checkpoint is missing, corrupt, or does not match the architecture it is loaded into."""


class JobError(OmnilabelError):
    """A job cannot start or resume (mismatched job directory, no workers, a lost cluster)."""
