"""The toolkit's exceptions: one base class, which the CLI turns into one line on stderr and
exit status 2, and one subclass per kind of problem."""

from __future__ import annotations


class EtCircuitsError(Exception):
    """Base of every error the toolkit raises on purpose; the message says what to do."""


class SetupError(EtCircuitsError, RuntimeError):
    """A model, device or file cannot be used as given (unknown model, missing weights,
    unsupported architecture, unavailable device, no browser for PNG export)."""


class DataError(EtCircuitsError, ValueError):
    """Prompts cannot be built or used as asked (too few usable tokens, impossible parameters,
    prompt sets that do not fit together)."""


class CircuitError(EtCircuitsError, ValueError):
    """A circuit, a result file or a method's arguments are malformed or do not fit the model."""
