"""The one exception type users see: its message always says what to do next."""


class FeaturecacheError(Exception):
    """A problem with the user's input or environment, worded as the fix.

    Entry points print the message (no traceback) and exit with status 2.
    """
