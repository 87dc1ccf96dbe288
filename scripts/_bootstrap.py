"""Shared start-up for the scripts: repo root on sys.path (for ``configs``), one-line errors.

``run(main)`` replaces ``app.run(main)``: a mistake the user can fix -- a bad flag, an unknown
``--config.key``, a config file that does not load, and every :class:`stm_jax.errors.UserError`
(bad settings or data, a busy or foreign workdir, a damaged checkpoint) -- is printed as ONE
line ``error: ...`` on stderr with exit code 2, instead of absl's usage dump or a traceback.
Anything else, a ``ValueError`` or ``KeyError`` included, is a bug and keeps its traceback.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print ``error: message`` as one line on stderr and exit with code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _flag_error(error: Exception) -> str:
    """absl's message, cut to its first line plus, for a config file that raised, the error."""
    message = str(error)
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    if "Traceback" in message:  # a config file's get_config() raised: keep its last line
        first = f"{first.rstrip(':')}: {_last_line(message)}"
    return first


def _unknown_override(error: Exception, argv: list[str]) -> str:
    """config_flags raises a bare AttributeError/KeyError for ``--config.no_such_key``."""
    key = str(error).strip("'\" ")
    overrides = [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--")]
    culprit = next((arg for arg in overrides if "." in arg and key in arg.split(".")), None)
    return (f"{culprit or key}: the config has no key {key!r}; check the spelling against the "
            "config file (shared keys are in configs/common.py)")


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: parses ``argv``; any parsing problem is one line and exit 2."""
    from absl import flags

    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        fail(f"{_flag_error(error)} (see --helpshort)")
    except (AttributeError, KeyError) as error:
        fail(_unknown_override(error, argv))
    # config_flags defers a config file that failed to load until first access; do it now.
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        if type(value).__name__ == "_ErrorConfig":
            try:
                value.lock()
            except OSError as error:
                detail = _last_line(error)
                fail(f"--{name}: cannot load the config file ({detail})")
    return remaining


def run_main(main_fn, argv) -> None:
    """Call ``main_fn(argv)``; print user-fixable errors as one line and exit non-zero."""
    from absl import app

    from stm_jax.errors import UserError

    try:
        main_fn(argv)
    except (UserError, app.UsageError) as error:
        fail(error)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def run(main_fn) -> None:
    """``app.run(main_fn)`` with one-line errors for bad flags and for user errors in main."""
    from absl import app

    app.run(lambda argv: run_main(main_fn, argv), flags_parser=parse_flags)
