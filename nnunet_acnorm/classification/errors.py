"""The one exception type the classification commands turn into a one-line error message."""


class ClassificationInputError(ValueError):
    """Bad user input (files, CSV, options, checkpoints): the message says what and what to do."""
