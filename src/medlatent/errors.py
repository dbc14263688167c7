"""medlatent's exceptions, each turned by the CLI into a single line on stderr.

`MedlatentInputError`: bad user input (exit code 2); everything inside the package may therefore
trust data that passed the boundary checks. `MedlatentRuntimeError`: a failure that is not the
user's input, e.g. a crashed worker process (exit code 1).
"""


class MedlatentError(Exception):
    """Its message is one line: line breaks in what it quotes (a file name, a value) are shown escaped."""

    exit_code = 1

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class MedlatentInputError(MedlatentError, ValueError):
    """Bad input named by the user: a file, a row, an option. The message says what to do."""

    exit_code = 2


class MedlatentRuntimeError(MedlatentError, RuntimeError):
    """A failure the user's input did not cause; the message says what happened."""

    exit_code = 1
