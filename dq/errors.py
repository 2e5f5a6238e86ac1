"""One exception type for bad user input, so entry points can print it as one line."""
import difflib
import sys


class DQError(ValueError):
    """A user-facing error: the message names the bad value and the valid choices."""


def choice_error(what: str, value: object, choices) -> DQError:
    return DQError(f"unknown {what} {value!r}; valid choices: {', '.join(map(str, choices))}")


def name_error(what: str, value: str, kind: str, names) -> DQError:
    """``value`` names no ``kind`` among ``names`` (too many to list): the closest ones, or the first, as examples."""
    names = list(names)
    near = difflib.get_close_matches(value, names, n=3, cutoff=0.5) or names[:3]
    return DQError(f"{what} {value!r} names no {kind}; layer names look like {', '.join(near)}")


def run_script(main) -> None:
    """A script's entry point: exit with main()'s status; a DQError is one line on stderr and status 2."""
    try:
        sys.exit(main())
    except DQError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
