"""``python -m layercard`` and the ``layercard`` command: the command line, also as a module for launchers
(``accelerate launch -m``)."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Run the command line. A Ctrl-C while it is still importing (torch takes about a second) is said as
    one ``interrupted`` line and exit 130, as it is in a running command, not as a traceback. A SIGTERM
    (a job scheduler's stop, ``kill``) ends a command as a Ctrl-C does, where it had ended it at once,
    leaving its temporaries and lock for the next command to sweep."""
    from layercard.errors import stop_as_interrupted

    signal.signal(signal.SIGTERM, stop_as_interrupted)
    try:
        from layercard.cli import app

        app(prog_name="layercard")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# Guarded: worker processes started by spawning import this module again under another name.
if __name__ == "__main__":
    main()
