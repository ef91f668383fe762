"""Console entry point: one place that turns every failure into one stderr line and an exit code.

It stays free of click so `sign-csr` can take the fast path; all other
commands (and anything the fast path does not recognise) go through click.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kvpki_cli.errors import EXIT_BACKEND, EXIT_INTERNAL, KvpkiError
from kvpki_cli.messages import error_line


def _run(args: list[str]) -> int:
    if not os.environ.get("KVPKI_NO_FASTPATH"):
        from kvpki_cli.fastpath import parse_fast_sign

        options = parse_fast_sign(args)
        if options is not None:
            from kvpki_cli.signing import sign_csrs

            sign_csrs(options)
            return 0
    from kvpki_cli.cli import run_click

    return run_click(args)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("KVPKI_DEBUG"))
    try:
        code = _run(args)
    except KvpkiError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(error_line(str(exc)))
        code = exc.exit_code
    except BrokenPipeError:  # output written outside write_stdout (e.g. a table on a closed stderr pipe)
        from kvpki_cli.signing import discard_stdout

        discard_stdout()
        with contextlib.suppress(OSError):
            sys.stderr.write(error_line("output closed (broken pipe)"))
        code = EXIT_BACKEND
    except KeyboardInterrupt:
        sys.stderr.write(error_line("interrupted"))
        code = 130
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(error_line(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)"))
        code = EXIT_INTERNAL
    try:
        sys.stdout.flush()
    except OSError as exc:
        from kvpki_cli.signing import discard_stdout

        discard_stdout()
        with contextlib.suppress(OSError):
            sys.stderr.write(error_line(f"cannot write to stdout: {exc.strerror or 'broken pipe'}"))
        code = code or EXIT_BACKEND
    sys.exit(code)
