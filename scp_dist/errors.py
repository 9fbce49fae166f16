"""The base of every error that names what the user must fix (a config key, a shard, a checkpoint,
a feature cache, a busy run directory): the entry points print these as one line, not a traceback.

Each error lives next to the code that raises it and derives from UserError; ConfigError lives here
because the data path raises it too and must not import the config module that imports it.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key."""


# What the entry points report as one line: a missing file is named by the OS error's message.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
