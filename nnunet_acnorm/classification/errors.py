"""The one exception type the classification commands turn into a one-line error message."""
from nnunet_acnorm.errors import InputError


class ClassificationInputError(InputError):
    """Bad user input (files, CSV, options, checkpoints): the message says what and what to do."""
