"""Device emulators: each speaks a real interface (serial pty, UDP, HTTP, PulseAudio),
runs on its own :class:`hil.world.DeviceClock` and writes ground truth."""
