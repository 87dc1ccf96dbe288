"""Shared start-up for the scripts: repo root on sys.path (for ``configs``), one-line errors."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Errors a user can fix get one clear line and exit code 2 instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, PermissionError)


def run_main(main_fn, argv) -> None:
    """Call ``main_fn(argv)``; print user-fixable errors as one line and exit non-zero."""
    from stm_jax.checkpointing import CheckpointError
    from stm_jax.train import TrainingError

    try:
        main_fn(argv)
    except (CheckpointError, TrainingError, *USER_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
