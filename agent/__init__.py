"""edgecap agent: config, clock, pipeline, labelers, recorder, replay, export and CLI."""

__version__ = "0.1.0"
