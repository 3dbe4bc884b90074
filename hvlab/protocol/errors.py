"""The one error type every wire-format parser raises: which field, its value, and what is wrong.

Host code turns it into a protocol-violation report for the channel or device (``field`` and
``value`` go into the log and the timeline), so each protocol only names itself with ``what``.
"""

from __future__ import annotations


class FieldError(ValueError):
    """A message that is too short or has a bad field; subclasses set ``what`` (the message's name)
    and ``hex_value`` (how ``value`` is printed)."""

    what = "message"
    hex_value = True

    def __init__(self, field: str, value: int, detail: str) -> None:
        shown = f"{value:#x}" if self.hex_value else f"{value}"
        super().__init__(f"{self.what} {field}={shown}: {detail}")
        self.field = field
        self.value = value
        self.detail = detail
