"""Errors the user can fix. The CLI prints their message as one line and exits 2."""


class UnlearnError(Exception):
    """Bad input: a missing file, an empty set, an unknown method, a bad value."""


class DataError(UnlearnError):
    """A data source cannot be read or yields nothing usable."""
