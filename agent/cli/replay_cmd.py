"""``edgecap replay``, ``edgecap relabel`` and ``edgecap export``: recorded sessions back
through the pipeline, into new label channels and into labeling tools."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from agent.errors import DriverError


def _source_options(endpoint: str | None, cache: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if endpoint:
        out["endpoint_url"] = endpoint
    if cache:
        out["cache_dir"] = cache
    return out


def zmq_endpoint(spec: str) -> str:
    """``zmq://127.0.0.1:7460`` → ``tcp://127.0.0.1:7460``; ``tcp://``/``ipc://`` as is."""
    if spec.startswith("zmq://"):
        return "tcp://" + spec[len("zmq://"):]
    if spec.startswith(("tcp://", "ipc://", "inproc://")):
        return spec
    raise click.BadParameter(f"{spec!r}: expected zmq://HOST:PORT, tcp://… or ipc://…")


def run_replay(session: str, rate: float = 1.0, max_rate: bool = False,
               t_from: float | None = None, t_to: float | None = None,
               streams: list[str] | None = None, loop: bool = False,
               publish: str | None = None, foxglove: int | None = None,
               record: str | None = None, realtime: bool | None = None,
               source: dict[str, Any] | None = None,
               stop: threading.Event | None = None) -> dict[str, Any]:
    """Replay a session (paced by one PlaybackClock, or as fast as read) into the live
    publishers and/or a new recording. Blocks until the window ends (or ``stop`` is set,
    or forever with ``loop``). Returns a summary: samples per stream, jitter, publisher
    and recorder figures."""
    from agent.replay import McapReplay, McapReplayOptions

    if loop and record:
        raise click.UsageError("--loop and --record do not go together")
    paced = not max_rate
    opts = McapReplayOptions(rate=rate, max_rate=max_rate, from_s=t_from, to_s=t_to,
                             streams=list(streams or []), loop=loop,
                             realtime=paced if realtime is None else realtime,
                             **(source or {}))
    drv = McapReplay("/replay", session, opts)
    stop = stop or threading.Event()
    pubs: list[Any] = []
    pipe = None
    t0 = time.monotonic()
    if record:
        pipe = _pipeline(drv, session, opts, record)
        infos: Any = lambda: pipe.infos  # noqa: E731
    else:
        drv.open()
        infos = {i.name: i for i in drv.streams()}
    try:
        if publish:
            from agent.publish import ZmqPublisher

            pubs.append(ZmqPublisher(zmq_endpoint(publish), infos))
        if foxglove is not None:
            from agent.publish import FoxgloveLive

            pubs.append(FoxgloveLive(infos, port=foxglove, clock=drv.clock,
                                     time_range=(drv.start_ns, drv.end_ns)))
        for p in pubs:
            p.start()
            where = (f"ws://127.0.0.1:{p.port} (open it in Foxglove: Open connection)"
                     if p.name == "foxglove" else p.endpoint)
            click.echo(f"publishing {p.name} on {where}", err=True)
        if pipe is not None:
            for p in pubs:
                p.attach(pipe)
            if max_rate:
                qs = list(pipe.queues.values())
                drv.backpressure = lambda: any(len(q) * 2 >= q.max_items for q in qs)
            pipe.start()
            while not stop.wait(0.1):
                if pipe.wait_sources_done(0):
                    break
        else:
            th = threading.Thread(target=_drive, args=(drv, pubs), name="replay", daemon=True)
            th.start()
            while th.is_alive() and not stop.wait(0.1):
                pass
            drv.close()
            th.join(5.0)
    finally:
        if pipe is not None:
            pipe.stop()
        else:
            drv.close()
        for p in pubs:
            p.stop()
    out: dict[str, Any] = {
        "session": session, "samples": dict(drv.emitted), "received": drv.counters["received"],
        "wall_s": round(time.monotonic() - t0, 3),
        "span_s": round(drv.duration_ns / 1e9, 3), "rate": None if max_rate else rate,
        "jitter": drv.jitter(), "counters": drv.counters.as_dict(),
        "publishers": {p.name: p.stats() for p in pubs}}
    if pipe is not None:
        out["recorded"] = {"session_dir": str(pipe.session_dir),
                           "segments": [str(s) for s in pipe.recorder.closed_segments],
                           "queue_drops": {n: q.dropped for n, q in pipe.queues.items()
                                           if q.dropped}}
    return out


def _drive(drv: Any, pubs: list[Any]) -> None:
    for s in drv:
        for p in pubs:
            p.tap(s)


def _pipeline(drv: Any, session: str, opts: Any, out: str) -> Any:
    """A Pipeline recording the replay into ``out`` with the source session's device id,
    window and provenance (t_ns kept: the recorder's windows start where the source's
    did)."""
    from agent.config import parse_config
    from agent.pipeline import Pipeline

    drv.open()
    reader = drv.reader
    sess = reader.metadata.get("edgecap.session", {})
    prov = reader.metadata.get("edgecap.provenance", {})
    seg = drv.session.segments[0]
    window_s = 10.0
    if seg.window is not None:
        window_s = (seg.window[1] - seg.window[0]) / 1e9
    provenance: dict[str, Any] = {}
    for k in ("source", "collection_method", "consent_status", "annotation_approach"):
        if k in prov:
            provenance[k] = prov[k]
    limits = prov.get("known_limitations")
    if limits:
        try:
            provenance["known_limitations"] = list(json.loads(limits))
        except ValueError:
            pass
    provenance.setdefault("known_limitations", []).append(
        f"replayed from session {drv.session.session_id}")
    cfg = parse_config({
        "device_id": sess.get("device_id") or "replay",
        "streams": [{"name": "/replay", "driver": "replay.mcap", "uri": session,
                     "options": opts.model_dump(exclude_none=True, mode="json"),
                     "queue_size": 256}],
        "recorder": {"out_dir": out, "window_s": window_s},
        "provenance": provenance,
    }, path=f"<replay {session}>")
    pipe = Pipeline(cfg, out_dir=out, drivers=[drv], live=False)
    pipe.open()  # opens the driver again (same session): cheap, summaries only
    wn = int(window_s * 1e9)
    assert pipe.recorder is not None
    t0 = seg.window[0] if seg.window is not None else drv.start_ns - drv.start_ns % wn
    pipe.recorder.t0_ns = t0
    pipe.recorder._max_t = t0
    return pipe


@click.command("replay")
@click.argument("session")
@click.option("--rate", "-r", type=float, default=1.0, show_default=True,
              help="Speed factor (10 = ten times real time).")
@click.option("--max", "max_rate", is_flag=True, help="As fast as it reads (no pacing).")
@click.option("--from", "t_from", type=float, default=None,
              help="Start this many seconds after the session's first sample.")
@click.option("--to", "t_to", type=float, default=None,
              help="End this many seconds after the session's first sample.")
@click.option("--streams", "-s", multiple=True,
              help="Stream names or globs (repeat; default all), e.g. -s '/camera/*'.")
@click.option("--loop", is_flag=True, help="Start over at the end (t_ns keeps rising).")
@click.option("--publish", help="ZeroMQ PUB endpoint, e.g. zmq://127.0.0.1:7460.")
@click.option("--foxglove", type=int, default=None,
              help="Foxglove WebSocket live view on this port (127.0.0.1).")
@click.option("--record", type=click.Path(file_okay=False),
              help="Record the replay into this folder (a new session).")
@click.option("--realtime/--no-realtime", default=None,
              help="SCHED_FIFO pacing thread (default: on when paced, if permitted).")
@click.option("--endpoint", help="S3 endpoint URL for s3:// sessions (e.g. MinIO).")
@click.option("--cache", type=click.Path(file_okay=False),
              help="Download cache for s3:// sessions.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def replay(session: str, rate: float, max_rate: bool, t_from: float | None,
           t_to: float | None, streams: tuple[str, ...], loop: bool, publish: str | None,
           foxglove: int | None, record: str | None, realtime: bool | None,
           endpoint: str | None, cache: str | None, as_json: bool) -> None:
    """Replay SESSION (a folder, an .mcap, an ingest-store folder or s3://…) at its own
    pace, into live publishers and/or a new recording. Ctrl-C stops."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        res = run_replay(session, rate, max_rate, t_from, t_to, list(streams), loop, publish,
                         foxglove, record, realtime, _source_options(endpoint, cache), stop)
    except DriverError as e:
        click.echo(f"cannot replay: {e}", err=True)
        sys.exit(3)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if as_json:
        click.echo(json.dumps(res, indent=1, default=str))
        return
    j = res["jitter"]
    click.echo(f"replayed {res['received']} samples of {res['span_s']:.1f} s in "
               f"{res['wall_s']:.1f} s" + (f" (jitter p50 {j['p50_ms']} ms, p99 "
                                          f"{j['p99_ms']} ms)" if j["samples"] else ""))
    for name, n in sorted(res["samples"].items()):
        click.echo(f"  {name:32s} {n}")
    for name, st in res["publishers"].items():
        click.echo(f"  publisher {name}: {st}")
    if "recorded" in res:
        click.echo(f"recorded → {res['recorded']['session_dir']}")


@click.command("relabel")
@click.argument("session")
@click.option("--labeler", "kind", required=True, help="Labeler kind, e.g. camera.yolo.")
@click.option("--model", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Model file (ONNX) for the labeler.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the new session (default: beside the source session).")
@click.option("--streams", "-s", multiple=True, help="Input streams or globs (default all "
              "the labeler accepts).")
@click.option("--option", "-o", "options", multiple=True,
              help="Labeler option KEY=VALUE (JSON values), e.g. -o conf=0.4.")
@click.option("--tag", help="Version tag of the new channels (default: model sha256[:8]).")
@click.option("--endpoint", help="S3 endpoint URL for s3:// sessions.")
@click.option("--cache", type=click.Path(file_okay=False))
def relabel_cmd(session: str, kind: str, model: str | None, out: str | None,
                streams: tuple[str, ...], options: tuple[str, ...], tag: str | None,
                endpoint: str | None, cache: str | None) -> None:
    """Re-run a labeler over SESSION into new, versioned label channels (old ones kept) in
    a new session folder; manifests are regenerated and verified."""
    from agent.labelers import LabelerError
    from agent.relabel import RelabelError, relabel
    from agent.replay import ReplaySourceOptions

    opts: dict[str, Any] = {}
    for kv in options:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except ValueError:
            opts[k] = v
    try:
        res = relabel(session, kind, model, out, list(streams), opts, tag,
                      ReplaySourceOptions(**_source_options(endpoint, cache)), progress=True)
    except (RelabelError, LabelerError, DriverError) as e:
        click.echo(f"cannot relabel: {e}", err=True)
        sys.exit(2)
    click.echo(f"relabeled → {res.session_dir}  (tag {res.tag}, {res.labeled} samples "
               f"labeled, {res.errors} errors, {res.bad_input} bad input)")
    for name, n in sorted(res.streams.items()):
        click.echo(f"  {name:40s} {n} labels")
    if res.problems:
        click.echo("VERIFY PROBLEMS:\n  " + "\n  ".join(res.problems), err=True)
        sys.exit(1)
    click.echo(f"verified {len(res.segments)} segment(s)")


@click.command("export")
@click.argument("session")
@click.option("--format", "fmt", type=click.Choice(["coco", "labelstudio", "cvat"]),
              required=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--streams", "-s", multiple=True, help="Sensor streams or globs (default all).")
@click.option("--labels", "-l", multiple=True, help="Label streams or globs (default all).")
@click.option("--from", "t_from", type=float, default=None)
@click.option("--to", "t_to", type=float, default=None)
@click.option("--only-triggered", is_flag=True, help="Only data inside trigger windows.")
@click.option("--url-prefix", default="", help="Label Studio: prefix of data URLs.")
@click.option("--clip-s", type=float, default=30.0, show_default=True,
              help="Label Studio: audio clip length.")
@click.option("--pcd-ascii", is_flag=True, help="CVAT: ASCII instead of binary PCD.")
@click.option("--endpoint", help="S3 endpoint URL for s3:// sessions.")
@click.option("--cache", type=click.Path(file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export_cmd(session: str, fmt: str, out: str, streams: tuple[str, ...],
               labels: tuple[str, ...], t_from: float | None, t_to: float | None,
               only_triggered: bool, url_prefix: str, clip_s: float, pcd_ascii: bool,
               endpoint: str | None, cache: str | None, quiet: bool) -> None:
    """Export SESSION's images, audio and point clouds with their pre-labels for COCO,
    Label Studio or CVAT (see docs/replay.md for the layouts)."""
    from agent.export import ExportError, ExportOptions, export
    from agent.replay import ReplaySourceOptions

    opts = ExportOptions(Path(out), list(streams), list(labels), t_from, t_to, only_triggered,
                         not quiet, ReplaySourceOptions(**_source_options(endpoint, cache)))
    kw: dict[str, Any] = {}
    if fmt == "labelstudio":
        kw = {"url_prefix": url_prefix, "clip_s": clip_s}
    elif fmt == "cvat":
        kw = {"pcd_ascii": pcd_ascii}
    t0 = time.monotonic()
    try:
        res = export(session, fmt, opts, **kw)
    except (ExportError, DriverError) as e:
        click.echo(f"cannot export: {e}", err=True)
        sys.exit(2)
    res["wall_s"] = round(time.monotonic() - t0, 2)
    click.echo(json.dumps(res, indent=1))


COMMANDS = [replay, relabel_cmd, export_cmd]
