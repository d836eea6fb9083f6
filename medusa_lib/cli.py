"""The command lines' one rule for expected failures: one line on stderr naming what to do, exit 2.

    if __name__ == "__main__":
        run_cli(main)

A missing export, a bad setting or a damaged file is a message the user acts on, not a Python
traceback; a bug (any other exception) still shows its traceback.
"""

from __future__ import annotations

import sys

EXPECTED = (FileNotFoundError, ValueError, RuntimeError, NotImplementedError, IsADirectoryError, NotADirectoryError,
            PermissionError)


def run_cli(main, argv=None) -> None:
    try:
        main(argv)
    except EXPECTED as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume.", file=sys.stderr)
        raise SystemExit(130) from None
