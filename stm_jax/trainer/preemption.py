"""Stopping a run cleanly on SIGTERM or SIGINT (preemption, Ctrl-C): save the step, then exit."""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """SIGTERM/SIGINT set a flag that the training loop checks at every step boundary.

    The first signal also restores the default action of both signals, so a second one ends
    the process at once (exit by signal, nothing saved) even while the main thread is blocked
    saving a checkpoint. A signal is only seen when control returns to Python, e.g. after the
    running XLA computation. Outside the main thread (where Python cannot install handlers)
    this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        # os.write, not print: a handler may run in the middle of another print.
        os.write(2, f"{self.signal_name} received: stopping after the current step to save a "
                    "checkpoint; send it again to exit at once without saving\n".encode())

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python (JAX's preemption notifier, say).
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
