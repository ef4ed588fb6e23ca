"""The one base class of every error a user can cause; the command line reports these in one line and lets any
other exception surface as the bug it is."""

from __future__ import annotations


class ElderError(Exception):
    """Bad input, a bad setting, a missing or damaged file: something the user can fix, said in one line."""


class NonFiniteLossError(ElderError, RuntimeError):
    """Training produced a NaN or infinite loss (the learning rate is too high for the model); nothing of that
    batch was kept."""
