"""Hardware-in-the-loop rig: a synthetic world, device emulators speaking real interfaces
(serial pty, UDP, HTTP, PulseAudio), scenarios and ground truth for scoring the agent."""
