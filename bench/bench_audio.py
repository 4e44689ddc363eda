"""The HIL microphone emulator's own CPU cost while it plays city-drive audio into the
PulseAudio null sink (48 kHz): this process's CPU (the emulator's writer threads) plus
its ``pacat`` player, as a share of one core; the physical limit it is held against is
one core (the rig must leave room for the agent on 2 cores)."""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

from bench import Result


def _children_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid``'s live child processes (the player), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


def run(quick: bool = False) -> list[Result]:
    from hil.emulators.audio import AudioEmulator
    from hil.pulse import PulseServer
    from hil.scenario import load_scenario
    from hil.world import World

    seconds = 6.0 if quick else 15.0
    sc = load_scenario("city-drive", duration_s=seconds + 5)
    with tempfile.TemporaryDirectory() as d, PulseServer() as pa:
        emu = AudioEmulator(World(sc), sc.devices.audio, Path(d), time.monotonic_ns(),
                            pulse=pa)
        emu.start()
        time.sleep(1.0)  # start-up (speech synthesis, player spawn) is not steady state
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = _children_cpu_s(os.getpid())
        t0 = time.monotonic()
        time.sleep(seconds)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = _children_cpu_s(os.getpid())
        wall = time.monotonic() - t0
        emu.stop()
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    share = (own + (c1 - c0)) / wall
    return [Result("audio emulator CPU at 48 kHz (writer + player)", 100 * share, "% core",
                   "one core", share, goal=0.1, higher_is_better=False,
                   extra={"own_s": own, "player_s": c1 - c0, "wall_s": wall})]
