"""``edgecap sync run|serve|ls|status`` and ``edgecap keys generate``."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import click

from agent.errors import ConfigError, EdgecapError


def _fail(e: Exception, code: int = 2) -> None:
    for line in str(e).splitlines():
        click.echo(line, err=True)
    sys.exit(code)


def _stop_on_signals(stop: threading.Event) -> dict[int, Any]:
    return {sig: signal.signal(sig, lambda *_: stop.set())
            for sig in (signal.SIGINT, signal.SIGTERM)}


def _metrics_server(port: int | None, registry: Any) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1", registry=registry)
        click.echo(f"metrics on http://127.0.0.1:{port}/metrics", err=True)


@click.group("sync")
def sync_group() -> None:
    """Upload bundles to an ingest server, or run one (docs/sync.md)."""


@sync_group.command("run")
@click.option("--config", "-c", required=True, type=click.Path(dir_okay=False),
              help="Rig file with a [sync] table.")
@click.option("--once", is_flag=True, help="Upload what is pending now, then exit.")
@click.option("--spool", type=click.Path(file_okay=False), default=None,
              help="Spool directory (default: sync.spool_dir, else recorder.out_dir).")
@click.option("--give-up", type=float, default=60.0, show_default=True,
              help="With --once: stop after this many seconds without progress.")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT.")
def run(config: str, once: bool, spool: str | None, give_up: float,
        metrics_port: int | None) -> None:
    """Upload closed segments and their manifests, best first. Exit status with --once:
    0 when nothing is left, 1 when bundles remain, 2 on a config error."""
    from agent.config import load_config
    from sync.uploader import Uploader

    try:
        cfg = load_config(config, check_drivers=False)
        progress, finish = _progress()
        up = Uploader.from_rig(cfg, spool_dir=spool, progress=progress)
    except ConfigError as e:
        _fail(e)
    _metrics_server(metrics_port, up.metrics.registry)
    stop = threading.Event()
    previous = _stop_on_signals(stop)
    try:
        if once:
            threading.Thread(target=lambda: (stop.wait(), up.stop()), daemon=True).start()
            s = up.run_once(give_up_s=give_up)
            finish()
            click.echo(f"uploaded {s.uploaded} bundle(s) ({s.stored} stored, "
                       f"{s.duplicates} already held; {s.verified} verified), "
                       f"{s.bundle_bytes / 1e6:.1f} MB in {s.seconds:.1f} s; re-sent "
                       f"{s.resent_bytes} B; {s.reconnects} reconnect(s); {s.pending} "
                       f"pending, {s.skipped} skipped"
                       + (f"; outside upload hours {up.cfg.upload_hours}"
                          if s.outside_window else "")
                       + (f"; {s.error}" if s.error else ""))
            sys.exit(0 if s.pending == 0 and not s.auth_rejected else 1)
        click.echo(f"uploading from {up.spool.root} to {up.cfg.server} "
                   f"(Ctrl-C to stop)", err=True)
        loop = threading.Thread(target=up.run_forever, args=(stop,), name="uploader",
                                daemon=True)
        loop.start()
        _supervise(loop, stop)
        up.stop()
        loop.join(15)
        finish()
    finally:
        up.close()
        for sig, h in previous.items():
            signal.signal(sig, h)


def _supervise(loop: threading.Thread, stop: threading.Event) -> None:
    """Main thread of a service: READY=1 once its loop runs, WATCHDOG=1 while the loop
    thread is alive (systemd restarts the service if it dies), until ``stop``."""
    from agent.notify import Heartbeat

    hb = Heartbeat()
    hb.ready("serving")
    while not stop.wait(1.0):
        if loop is None or not loop.is_alive():
            click.echo("service loop ended unexpectedly", err=True)
            sys.exit(1)
        hb.beat()


def _progress() -> tuple[Any, Any]:
    """A rich progress display on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), console=Console(stderr=True), transient=True)
    tasks: dict[str, Any] = {}
    started = [False]

    def update(key: str, done: int, total: int) -> None:
        if not started[0]:
            bar.start()
            started[0] = True
        if key not in tasks:
            tasks[key] = bar.add_task(key.split("/")[-1], total=total)
        bar.update(tasks[key], completed=done)
        if done >= total:
            bar.remove_task(tasks.pop(key))

    def finish() -> None:
        if started[0]:
            bar.stop()

    return update, finish


@sync_group.command("serve")
@click.option("--config", "-c", required=True, type=click.Path(dir_okay=False),
              help="ingest.toml")
def serve(config: str) -> None:
    """Run an ingest server until Ctrl-C/SIGTERM. SIGHUP re-reads the client allow-list."""
    from sync.ingest import IngestServer
    from sync.ingest_config import load_ingest_config

    try:
        cfg = load_ingest_config(config)
        srv = IngestServer(cfg)
    except ConfigError as e:
        _fail(e)
    stop = threading.Event()
    _stop_on_signals(stop)
    signal.signal(signal.SIGHUP, lambda *_: click.echo(
        f"allow-list reloaded: {srv.reload_keys()} key(s)", err=True))
    _metrics_server(cfg.metrics_port, srv.metrics.registry)
    try:
        srv.start()
    except EdgecapError as e:
        _fail(e)
    try:
        _supervise(srv._thread, stop)
    finally:
        srv.stop()


@sync_group.command("ls")
@click.option("--config", "-c", required=True, type=click.Path(dir_okay=False),
              help="ingest.toml (for its storage backend)")
@click.option("--device", default=None)
@click.option("--session", default=None)
@click.option("--verify", is_flag=True, help="Re-hash every listed blob.")
def ls(config: str, device: str | None, session: str | None, verify: bool) -> None:
    """List received bundles per device and session (exit 1 if --verify finds a bad one)."""
    import hashlib

    from rich.console import Console
    from rich.table import Table

    from sync import storage
    from sync.ingest_config import load_ingest_config
    from sync.protocol import valid_id

    for name, v in (("--device", device), ("--session", session)):
        if v is not None and not valid_id(v):
            _fail(click.BadParameter(f"{name} {v!r} is not a valid id"))
    try:
        cfg = load_ingest_config(config)
        be = storage.create(cfg.storage.backend, cfg.storage.options)
    except EdgecapError as e:
        _fail(e)
    table = Table(title=be.describe())
    for col in ("device", "session", "bundle", "bytes", "sha256", "received by") + (
            ("verified",) if verify else ()):
        table.add_column(col)
    bad = n = 0
    for e in be.list_entries(device, session if device else None):
        if session and e.get("session") != session:
            continue
        n += 1
        row = [e["device"], e["session"], e["bundle"], str(e["size"]), e["sha256"][:12],
               str(e.get("server", ""))]
        if verify:
            h, size = hashlib.sha256(), 0
            try:
                for block in be.read_blob(e["sha256"]):
                    h.update(block)
                    size += len(block)
                ok = h.hexdigest() == e["sha256"] and size == e["size"]
            except EdgecapError:
                ok = False
            bad += not ok
            row.append("✓" if ok else "✗")
        table.add_row(*row)
    Console().print(table)
    click.echo(f"{n} bundle(s)" + (f", {bad} failed verification" if verify else ""))
    be.close()
    sys.exit(1 if bad else 0)


@sync_group.command("status")
@click.option("--config", "-c", required=True, type=click.Path(dir_okay=False))
@click.option("--spool", type=click.Path(file_okay=False), default=None)
def status(config: str, spool: str | None) -> None:
    """What waits in the spool of a rig."""
    from agent.config import load_config
    from sync.uploader import spool_status

    try:
        cfg = load_config(config, check_drivers=False)
    except ConfigError as e:
        _fail(e)
    root = spool or cfg.sync.spool_dir or cfg.recorder.out_dir
    st = spool_status(root, cfg.device_id)
    click.echo(f"{root}: {st['pending']} pending ({st['pending_bytes'] / 1e6:.1f} MB), "
               f"{st['uploaded']} uploaded, {st['rejected']} rejected, "
               f"{st['recording']} being written")
    for k, v in st["skipped"].items():
        click.echo(f"  not uploadable ({k}): {v}")
    for key in st["next"]:
        click.echo(f"  next: {key}")


@click.group("keys")
def keys_group() -> None:
    """CURVE key pairs for the uploader and the ingest server."""


@keys_group.command("generate")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for NAME.key and NAME.key_secret.")
@click.option("--name", required=True, help="Key name, e.g. the device id or 'ingest'.")
@click.option("--force", is_flag=True, help="Replace existing key files.")
def generate(out_dir: str, name: str, force: bool) -> None:
    """Write a key pair: NAME.key (public, share it) and NAME.key_secret (mode 0600)."""
    from sync import keys

    try:
        pub, sec = keys.generate(out_dir, name, force)
    except ValueError as e:
        _fail(e, 1)
    click.echo(f"public key: {pub}\nsecret key: {sec} (mode 600; keep it on this machine)\n"
               f"share {pub.name}: a rig's goes into the ingest server's clients_dir, the "
               f"server's is every rig's sync.server_public_key")


COMMANDS = [sync_group, keys_group]
