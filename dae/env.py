"""The DAE_* on/off switches of the environment, all read one way."""
from __future__ import annotations

import os

ON, OFF = ("on", "1", "true", "yes"), ("off", "0", "false", "no")


class SwitchError(ValueError):
    """A DAE_* switch holds neither on nor off."""


def switch(name: str, default: bool = True) -> bool:
    """True for on/1/true/yes, False for off/0/false/no (any case); unset or empty: `default`.
    Any other value is a mistake worth stopping for, not a silent default."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise SwitchError(f"{name}={os.environ[name]!r}: must be one of on/off (or 1/0, true/false, yes/no)")
