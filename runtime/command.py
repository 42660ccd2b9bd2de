"""How every long landseg command ends (`python -m runtime ...` and each pipeline stage).

Exit status 0 on success; 2 on bad input, with one `error: ...` line naming the file, key or value
at fault; 130 on SIGINT (Ctrl-C) and 143 on SIGTERM (a job scheduler, `kill`, a closing terminal),
each with one line saying what was kept, and no traceback. SIGTERM is turned into an exception in
the main thread, so the clean-up that runs for Ctrl-C (temporaries removed, the destination left as
it was, `runtime.destination`) runs for it too.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable

from .errors import LandsegError

EXIT_BAD_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    swallows it on its way out."""


_pending: list[int] = []  # signals received by `run_command`'s handlers and not yet acted on


def _terminate(signum, frame) -> None:
    _pending.append(signum)
    raise Terminated()


def _interrupt(signum, frame) -> None:
    _pending.append(signum)
    raise KeyboardInterrupt()


def check_signals() -> None:
    """Raise again for a signal whose exception was swallowed on its way out: the handler runs at
    whatever line Python is at, and a library's bare `except:` (around an optional import, say) can
    catch it there. Called at safe points: before an output is renamed into place, between tiles,
    training steps and rasters. Without `run_command`'s handlers (inside QGIS) it does nothing."""
    if _pending:
        raise KeyboardInterrupt() if _pending[-1] == signal.SIGINT else Terminated()


def run_command(name: str, body: Callable[[], int], *, errors: tuple = (), interrupted: str) -> int:
    """Run `body()` and turn its end into an exit status (module docstring).

    errors: exception types, besides LandsegError, that are bad input (printed, status 2).
    interrupted: what an interruption leaves, e.g. "nothing written to OUT"."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        previous = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTERM, _terminate),
                                                                          (signal.SIGINT, _interrupt))}
    _pending.clear()
    try:
        return body()
    except (LandsegError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{name}: interrupted (SIGINT); {interrupted}", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print(f"{name}: terminated (SIGTERM); {interrupted}", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        _pending.clear()
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
