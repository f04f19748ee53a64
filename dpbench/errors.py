"""User-facing errors: one line that names the fix; the CLI prints it and exits non-zero."""
from __future__ import annotations


class DPBenchError(Exception):
    """A problem with the user's input (config, data, paths, budgets).

    The message is one line and says what to change, e.g.
    ``privacy.epsilon must be > 0 (got -1); set privacy.epsilon=8``.
    """


class ConfigError(DPBenchError):
    """Invalid or inconsistent configuration."""


class DataError(DPBenchError):
    """Missing, malformed or empty data."""


class PrivacyError(DPBenchError):
    """A request the privacy machinery cannot honour (bad budget, unsupported trainable module...)."""
