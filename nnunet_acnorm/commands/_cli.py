"""The one exit convention of the console scripts."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

from nnunet_acnorm.errors import InputError


def one_line(message: str) -> str:
    """The line of ``message`` to show: a DataLoader worker's error keeps only its own last line."""
    message = str(message).strip()
    if "Original Traceback" in message:
        last = message.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message or "unknown error"


def fail(prog: str, message: str) -> NoReturn:
    """End the command: ``<prog>: error: <message>`` on stderr, exit status 1."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(1)


def run_command(prog: str, main: Callable[[list[str] | None], object], argv: list[str] | None = None,
                errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``main(argv)``; an :class:`~nnunet_acnorm.errors.InputError` (or one of ``errors``) ends the
    command with one line and status 1, an interrupt with status 130."""
    try:
        main(argv)
    except (InputError, *errors) as e:
        fail(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
