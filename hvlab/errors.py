"""Exceptions that the CLI turns into one clear line and a documented exit code."""

from __future__ import annotations


class HvlabError(Exception):
    """A failure the user can act on; the message says what and, where possible, what to do."""

    exit_code = 2


class KvmUnusable(HvlabError):
    """KVM is absent or cannot run stock x86-64 guests here."""

    exit_code = 3


class NotFound(HvlabError):
    """A kernel, module, file or package that was asked for does not exist."""

    exit_code = 4


class GuestError(HvlabError):
    """The guest died, timed out or did not answer."""

    exit_code = 5
