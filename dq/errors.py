"""One exception type for bad user input, so entry points can print it as one line."""


class DQError(ValueError):
    """A user-facing error: the message names the bad value and the valid choices."""


def choice_error(what: str, value: object, choices) -> DQError:
    return DQError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")
