"""User-facing errors: ``mim`` prints their message alone (no traceback) from the command line."""


class UserError(Exception):
    """Marker base: a wrong input or config that the user can fix; the message names cause and fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (raised before training starts)."""
