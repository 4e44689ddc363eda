"""Scheduling for threads that must act on time (a replay's pacing, an emulator's sender).

    realtime_thread(priority=10)          # True: SCHED_FIFO granted

Contract: the *calling* thread asks for ``SCHED_FIFO`` at ``priority`` (Linux; needs root
or CAP_SYS_NICE); where that is refused and ``nice_fallback`` is set it asks for nice −10
instead (refusal ignored). Either way the interpreter's switch interval is lowered to
:data:`SWITCH_INTERVAL_S` for the whole process (never raised), so a woken thread gets the
GIL back from busy threads within that rather than the default 5 ms. Returns whether
``SCHED_FIFO`` was granted; never raises.
"""

from __future__ import annotations

import os
import sys
import threading

SWITCH_INTERVAL_S = 0.0002


def realtime_thread(priority: int = 10, nice_fallback: bool = False) -> bool:
    """See the module docstring."""
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (AttributeError, OSError):
        pass
    if nice_fallback:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except (AttributeError, OSError):
            pass
    return False
