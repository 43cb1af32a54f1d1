"""The one base class of the errors a user can fix: the CLI prints them without a traceback.

Every error autoseg raises for a bad input, a bad file or a bad setting derives from `AutosegError`
and names the file or setting and the fix. Anything else is a bug and keeps its traceback.
"""


class AutosegError(Exception):
    """A problem the user can fix (a file, a dataset, a setting); the message says what and how."""
