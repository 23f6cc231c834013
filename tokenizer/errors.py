"""The one exception type for bad input.

Every reader, dataset, loader and API function of this project raises :class:`InputError` (a
``ValueError``) when its input is wrong, with a message that names the file, row or field and says
what was expected. Batch jobs catch exactly this type to skip and count a bad row.
"""


class InputError(ValueError):
    """Bad input: the message names the source (file / row / field) and what was expected."""
