"""The exception root shared by all of lora-search.

It lives in ``training`` because that is the bottom layer: ``evaluation`` and ``search`` both import
``training``, never the other way round. Library code raises these; only the CLI catches them, prints
one line and exits non-zero.
"""


class LoraSearchError(Exception):
    """Root of every error a user can cause; the message names the thing and the fix."""


class ConfigError(LoraSearchError):
    """A config file is missing, not TOML, has an unknown key or a bad value."""
