"""One exception type for bad user input.

The CLI turns a `MedlatentInputError` into a single line on stderr and exit code 2; everything
inside the package may therefore trust data that passed the boundary checks.
"""


class MedlatentInputError(ValueError):
    """Bad input named by the user: a file, a row, an option. The message says what to do."""

    exit_code = 2
