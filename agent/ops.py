"""What ``edgecap record`` wires in for operations: the watchdog supervisor and the
metrics endpoint of one pipeline, behind three calls.

    ops = Operations.attach(pipe)     # after pipe.open(); starts the metrics endpoint
    ops.tick()                        # every loop turn (≤ WATCHDOG_USEC/2 apart)
    ops.close()                       # in finally, before or after pipe.stop()

All three run on the record loop's thread and do not block on the pipeline. A metrics
port that cannot be bound is logged and skipped: capture never dies for an observer.
"""

from __future__ import annotations

import logging
from typing import Any

from .metrics import MetricsServer, PipelineCollector
from .notify import Health, Notifier, Supervisor

log = logging.getLogger("edgecap.ops")


class Operations:
    def __init__(self, pipe: Any, notifier: Notifier | None = None,
                 metrics_port: int | None = None, **supervisor_kw: Any):
        self.pipe = pipe
        self.supervisor = Supervisor.for_pipeline(pipe, notifier, **supervisor_kw)
        self.health: Health | None = None
        ops = pipe.cfg.operations
        port = ops.metrics_port if metrics_port is None else metrics_port
        self.metrics: MetricsServer | None = None
        if port:
            self.metrics = MetricsServer(PipelineCollector(pipe, health=lambda: self.health),
                                         port=port, bind=ops.metrics_bind)

    @classmethod
    def attach(cls, pipe: Any, **kw: Any) -> "Operations":
        """Build and start (metrics endpoint up, supervisor counting from now)."""
        self = cls(pipe, **kw)
        if self.metrics is not None:
            try:
                self.metrics.start()
            except OSError as e:
                log.error("metrics endpoint %s:%d not started: %s", self.metrics.bind,
                          self.metrics.port, e)
                self.metrics = None
        return self

    def tick(self) -> Health:
        self.health = self.supervisor.tick(self.pipe.stats())
        return self.health

    def close(self) -> None:
        self.supervisor.stopping()
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
