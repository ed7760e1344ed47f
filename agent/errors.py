"""Error hierarchy shared by the agent and the build host.

Every error says what was expected, what was found and what to do. The command-line front ends turn
a ``BoostError`` into one line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class BoostError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(BoostError):
    """A configuration value is missing, unknown or of the wrong type."""

    def __init__(self, source: str, key_path: str, message: str) -> None:
        self.source = source
        self.key_path = key_path
        self.message = message
        where = f"{source}: {key_path}: " if key_path else f"{source}: "
        super().__init__(where + message)


class ArtifactError(BoostError):
    """An artifact is malformed, incomplete or does not match its manifest."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class SignatureError(ArtifactError):
    """A manifest signature is missing, invalid or made by a key that is not trusted."""

    def __init__(self, path: str, key_id: str, message: str) -> None:
        self.key_id = key_id
        super().__init__(path, message)


class RuntimeLoadError(BoostError):
    """The TVM runtime or a compiled module could not be loaded or run."""
