"""Base class of every error caused by the user's input (options, files, shards, states).

The CLI prints these as one clear line and exits with status 2; anything else is a bug.
"""


class UserError(Exception):
    pass
