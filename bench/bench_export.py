"""Export and replay of a reference session, measured against the machine in this run.

Reference session (written through the real Recorder, samples made by the synthetic
drivers' own generators, not paced): 4 cameras of 1920×1080 JPEG (noisy, ~q90, sizes as in
bench_recorder) at 30 fps, an OS1-64-sized LiDAR (64 × 1024 = 65,536 points) at 10 Hz, a
48 kHz microphone in 960-frame blocks, 10 Hz GPS, and label channels: 2D boxes on every
frame of every camera, 3D cuboids on every scan, speech segments every 3 s.

Figures:
- export COCO / Label Studio / CVAT at max rate: session seconds per wall second (goal ≥ 20×
  real time) and per CPU second (its copy process included), against three floors measured
  in the same run: writing the export's files (same count and sizes; its hard links made
  as links) from memory with the same writer, copying files of those sizes from the
  segment files in the kernel (``copy_file_range``, the same writer), and copying the
  session's segment files (``shutil.copyfile``);
- replay at max rate (records decoded into Samples) against mcap's own reader iterating the
  same messages undecoded;
- replay pacing at 1×: lateness of each sample against its due time, p50/p99/max, with the
  SCHED_FIFO pacing thread (the CLI default when permitted) and without; goal p99 ≤ 1 ms;
- replay at 10×: per-stream emitted rates against 10 × the recorded rates (goal ≤ 1 %).

The session is read from the page cache (it was just written): the figures are CPU-bound
export costs, not cold-disk reads. Order and disk state: the replay figures come first,
after ``os.sync()``, so no writeback of the bench's own files runs while it paces; every
export and floor writes a fresh folder after ``os.sync()``, and nothing is deleted before
the end: on this machine's ext4 (no journal) creating files within a minute of deleting
thousands is ~3× slower (the inode allocator skips recently freed inodes), which made the
earlier figures depend on what the previous measurement had deleted. A run that starts
within a minute of the last one's clean-up waits that minute out. The 1× pacing figure
runs its reading thread with SCHED_FIFO; the exports after it run with the scheduling
and GIL switch interval the bench started with, as ``edgecap export`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.labelers import ModelInfo, detection
from agent.labelers._audio import AUDIO_LABELS_SCHEMA, audio_payload
from agent.labelers._foxglove import image_annotations, scene_update
from agent.queues import StreamQueue
from agent.recorder import Recorder
from agent.types import Sample, StreamInfo, StreamKind
from bench import Result

CAMERAS = 4
FPS = 30
YOLO = ModelInfo("yolov8n-hil", "1", "ab" * 32, {"conf": 0.25})
CLUSTERS = ModelInfo("ransac-dbscan-clusters", "1", "", {"eps_m": 0.5})
VAD = ModelInfo("silero_vad", "5.1", "cd" * 32, {"threshold": 0.5})


def make_session(root: Path, seconds: float) -> Path:
    """Write the reference session (module doc) into ``root``; returns its folder."""
    from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations
    from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate

    from bench.bench_recorder import make_frames
    from drivers.synthetic import SyntheticAudio, SyntheticGps, SyntheticLidar

    frames = make_frames(6)
    lidar = SyntheticLidar("/lidar/top", "", SyntheticLidar.Options(rings=64, columns=1024),
                           10.0)
    lidar._t0 = 0
    audio = SyntheticAudio("/mic/cabin", "", SyntheticAudio.Options(block=960))
    audio._t0 = 0
    gps = SyntheticGps("/gps", "", None, 10.0)
    infos: dict[str, StreamInfo] = {}
    for i in range(CAMERAS):
        cam = f"/camera/{i}"
        infos[cam] = StreamInfo(cam, StreamKind.CAMERA, "jpeg", FPS, f"camera_{i}", None,
                                {"width": 1920, "height": 1080})
        infos[f"/labels/camera/{i}/yolo"] = StreamInfo(
            f"/labels/camera/{i}/yolo", StreamKind.LABEL, "protobuf", FPS, f"camera_{i}",
            params={"proto_class": ImageAnnotations, "labeler": "camera.yolo", "source": cam,
                    **YOLO.stream_params()})
    for info in lidar.streams() + audio.streams() + gps.streams():
        infos[info.name] = info
    infos["/labels/lidar/top/clusters"] = StreamInfo(
        "/labels/lidar/top/clusters", StreamKind.LABEL, "protobuf", 10.0, "lidar_top",
        params={"proto_class": SceneUpdate, "labeler": "lidar.clusters", "source": "/lidar/top",
                **CLUSTERS.stream_params()})
    infos["/labels/mic/cabin/vad"] = StreamInfo(
        "/labels/mic/cabin/vad", StreamKind.LABEL, "json", 1.0,
        params={"schema": "edgecap.AudioLabels", "json_schema": AUDIO_LABELS_SCHEMA,
                "labeler": "audio.vad", "source": "/mic/cabin", **VAD.stream_params()})
    sid = "benchrig_20260101T000000Z_0000"
    meta = {"edgecap.session": {"session_id": sid, "device_id": "benchrig"},
            "edgecap.streams": {i.name: json.dumps({
                "kind": i.kind.value, "encoding": i.encoding, "rate_hz": i.rate_hz,
                "params": {k: v for k, v in i.params.items() if isinstance(v, (int, float, str))}})
                for i in infos.values()}}
    t0 = 10_000_000_000_000
    rec = Recorder(root / sid, sid, meta, {"device_id": "benchrig"}, now_ns=lambda: 0,
                   t0_ns=t0, window_s=10.0, fsync_interval_s=1.0, late_grace_s=0.0,
                   live=False)
    queues = {n: StreamQueue(n, 1 << 20, 1 << 40) for n in infos}
    for n, i in infos.items():
        rec.add_stream(i, queues[n])
    rec.start()
    n_frames = int(seconds * FPS)
    for k in range(n_frames):
        t = t0 + k * 1_000_000_000 // FPS
        for i in range(CAMERAS):
            cam = f"/camera/{i}"
            ts = t + i * 1000
            queues[cam].put(Sample(cam, frames[(k + i) % len(frames)], ts + 2_000_000,
                                   device_t_ns=ts, seq=k, t_ns=ts))
            dets = [detection(cam, ts, "camera.yolo", ("car", "pedestrian", "cyclist")[j % 3],
                              0.4 + 0.1 * j, box=[100.0 + 200 * j + k % 50, 300.0,
                                                  260.0 + 200 * j + k % 50, 520.0])
                    for j in range(5)]
            queues[f"/labels/camera/{i}/yolo"].put(Sample(
                f"/labels/camera/{i}/yolo", image_annotations(ts, dets, YOLO, "camera.yolo",
                                                              cam), ts + 40_000_000, seq=k,
                t_ns=ts))
        if k % 3 == 0:
            lk = k // 3
            tl = t0 + lk * 100_000_000 + 5000
            s = lidar.make(lk, tl)
            s.host_rx_ns, s.t_ns = tl + 1_000_000, tl
            queues["/lidar/top"].put(s)
            dets = [detection("/lidar/top", tl, "lidar.clusters", "car", 0.7,
                              bbox3d={"center": [5.0 + j, 2.0 * j - 8, 0.8],
                                      "size": [4.5, 1.8, 1.5], "yaw": 0.1 * j}, points=50)
                    for j in range(8)]
            queues["/labels/lidar/top/clusters"].put(Sample(
                "/labels/lidar/top/clusters",
                scene_update(tl, "lidar_top", dets, CLUSTERS, "lidar.clusters", "/lidar/top"),
                tl + 60_000_000, seq=lk, t_ns=tl))
            g = gps.make(lk, tl + 7000)
            g.host_rx_ns, g.t_ns = tl + 8000, tl + 7000
            queues["/gps"].put(g)
    for b in range(int(seconds * 50)):
        tb = t0 + b * 20_000_000 + 11
        s = audio.make(b, tb)
        s.host_rx_ns, s.t_ns = tb + 21_000_000, tb
        queues["/mic/cabin"].put(s)
        if b % 150 == 149:
            seg = {"start_ns": tb - 2_000_000_000, "end_ns": tb - 800_000_000,
                   "kind": "speech", "score": 0.9, "open": False, "privacy": "speech"}
            queues["/labels/mic/cabin/vad"].put(Sample(
                "/labels/mic/cabin/vad", audio_payload("audio.vad", "/mic/cabin",
                                                       VAD.as_dict(), [seg], "speech"),
                tb + 1000, t_ns=tb))
    rec.stop(120)
    return root / sid


def _copy_floor(session: Path, dst: Path) -> float:
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for p in sorted(session.glob("*.mcap")):
        shutil.copyfile(p, dst / p.name)
    return time.perf_counter() - t


def _distinct(files: list[Path]) -> tuple[list[int], int]:
    """Sizes of the distinct files (hard links counted once) and the number of links."""
    seen: set[tuple[int, int]] = set()
    sizes = []
    for f in files:
        st = f.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            sizes.append(st.st_size)
    return sizes, len(files) - len(sizes)


def _file_floor(dst: Path, sizes: list[int], links: int) -> float:
    """Time to create files of these sizes from memory, and ``links`` hard links to them,
    with the exporters' writer (two threads): the floor of a one-file-per-frame format on
    this disk."""
    from agent.export.common import FileWriter

    blob = os.urandom(max(sizes, default=1))
    dirs = [dst / str(k) for k in range(8)]
    t = time.perf_counter()
    with FileWriter() as w:
        for k, n in enumerate(sizes):
            w.write(dirs[k % 8] / f"{k}.bin", blob[:n])
        for k in range(links):
            w.link(dirs[k % 8] / f"{k}.bin", dst / "links" / f"{k}.bin")
    return time.perf_counter() - t


def _kernel_copy_floor(session: Path, dst: Path, sizes: list[int], links: int) -> float:
    """The same files copied from the session's segment files in the kernel
    (``copy_file_range`` through the exporters' writer), from offsets spread over the
    segments: the floor of an export that copies recorded bytes."""
    from agent.export.common import FileWriter
    from agent.replay import MessageRef

    segs = [(p, p.stat().st_size) for p in sorted(session.glob("*.mcap"))]
    dirs = [dst / str(k) for k in range(8)]
    t = time.perf_counter()
    with FileWriter() as w:
        pos = 0
        for k, n in enumerate(sizes):
            path, seg_size = segs[k % len(segs)]
            pos = (pos + 7919 * 4096) % max(1, seg_size - n)
            w.write(dirs[k % 8] / f"{k}.bin", MessageRef(path, pos, n))
        for k in range(links):
            w.link(dirs[k % 8] / f"{k}.bin", dst / "links" / f"{k}.bin")
    return time.perf_counter() - t


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the exporters' copy
    process: its copies count as the export's CPU)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _settle_disk() -> None:
    """Write back what the bench wrote before the next measurement, so one figure does
    not pay for the last one's writeback."""
    os.sync()


#: when this bench last deleted its files (see ``_wait_after_deletes``)
_LAST_DELETE = Path(tempfile.gettempdir()) / "edgecap-bench-export.deleted"


def _wait_after_deletes(seconds: float = 65.0) -> float:
    """On ext4 without a journal (this machine's), the inode allocator skips inodes freed
    in the last minute, so creating thousands of files soon after deleting thousands is
    ~3× slower. Waits until a minute has passed since this bench last deleted its files
    (a run right after another); returns the seconds waited."""
    try:
        since = time.time() - _LAST_DELETE.stat().st_mtime
    except OSError:
        return 0.0
    wait = max(0.0, seconds - since)
    time.sleep(wait)
    return wait


def _replay_max(session: Path) -> tuple[float, int, int]:
    from agent.replay import McapReplay, McapReplayOptions

    drv = McapReplay("/r", str(session), McapReplayOptions(max_rate=True))
    drv.open()
    t = time.perf_counter()
    n = nbytes = 0
    for s in drv:
        n += 1
        nbytes += s.nbytes()
    return time.perf_counter() - t, n, nbytes


def _mcap_iter(session: Path) -> float:
    from mcap.reader import make_reader

    t = time.perf_counter()
    for p in sorted(session.glob("*.mcap")):
        with open(p, "rb") as f:
            for _ in make_reader(f).iter_messages(log_time_order=True):
                pass
    return time.perf_counter() - t


def _paced(session: Path, rate: float, seconds: float, realtime: bool) -> tuple[dict, dict]:
    """Replay ``seconds`` of the session at ``rate``: the lateness figures and, per stream,
    the emitted rate over the recorded one (slope of a line through (session time,
    emission time) of all its samples, so a late first sample does not skew it)."""
    from agent.replay import McapReplay, McapReplayOptions

    drv = McapReplay("/r", str(session), McapReplayOptions(rate=rate, to_s=seconds,
                                                           realtime=realtime))
    drv.open()
    pts: dict[str, list[tuple[int, int]]] = {}
    with _SchedulingRestored():
        for s in drv:
            pts.setdefault(s.stream, []).append((s.t_ns, time.monotonic_ns()))
    rates = {}
    for name, xy in pts.items():
        if len(xy) > 2:
            a = np.asarray(xy, np.float64)
            slope = np.polyfit(a[:, 0] - a[0, 0], a[:, 1] - a[0, 1], 1)[0]
            rates[name] = float(1.0 / slope)
    return drv.jitter(), rates


class _SchedulingRestored:
    """Pacing with ``realtime`` gives the iterating (this) thread SCHED_FIFO and lowers
    the interpreter's switch interval for the rest of the process; both are put back on
    exit, so the export figures measured afterwards run as ``edgecap export`` does
    (normal scheduling, the niceness the bench was started with), not as a realtime
    thread that also preempts everything else on the machine."""

    def __enter__(self) -> "_SchedulingRestored":
        import sys

        self._interval = sys.getswitchinterval()
        try:
            self._policy = os.sched_getscheduler(0), os.sched_getparam(0)
        except (AttributeError, OSError):
            self._policy = None
        return self

    def __exit__(self, *exc: object) -> None:
        import sys

        sys.setswitchinterval(self._interval)
        if self._policy is not None:
            try:
                os.sched_setscheduler(0, *self._policy)
            except OSError:
                pass


class _Steal:
    """Share of CPU time the hypervisor took from this VM (``/proc/stat`` steal) while a
    figure was measured: a lateness or wall figure with steal in it measures the host."""

    def __enter__(self) -> "_Steal":
        self._t0 = self._ticks()
        self.pct: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        t1 = self._ticks()
        if self._t0 and t1 and t1[1] > self._t0[1]:
            self.pct = round(100 * (t1[0] - self._t0[0]) / (t1[1] - self._t0[1]), 1)

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (v[7] if len(v) > 7 else 0), sum(v[:8])


def _replay_figures(session: Path, seconds: float, quick: bool) -> list[Result]:
    rep_s, n, nbytes = _replay_max(session)
    peer_s = _mcap_iter(session)
    out = [Result("replay --max (decoded samples)", n / rep_s, "samples/s",
                  reference=f"mcap reader, undecoded: {n / peer_s:.0f} msg/s",
                  ratio=peer_s / rep_s, ratio_desc="speed vs mcap reader",
                  extra={"wall_s": round(rep_s, 2), "x_real_time": round(seconds / rep_s, 1),
                         "decoded_mib_s": round(nbytes / 2**20 / rep_s, 1)})]
    pace_s = 4.0 if quick else 10.0
    for rt in (True, False):
        with _Steal() as steal:
            j, _ = _paced(session, 1.0, pace_s, rt)
        if j["p99_ms"] is None:
            continue
        out.append(Result(f"replay 1× lateness p99 ({'SCHED_FIFO' if rt else 'normal'})",
                          j["p99_ms"], "ms", reference=f"goal 1 ms; {steal.pct}% CPU stolen "
                          "by the host meanwhile", ratio=j["p99_ms"] / 1.0, goal=1.0,
                          higher_is_better=False, ratio_desc="p99 / 1 ms",
                          extra={**j, "steal_pct": steal.pct,
                                 "load_1min": round(os.getloadavg()[0], 2)}))
    j10, rates = _paced(session, 10.0, min(seconds, 10.0), True)
    worst = max(abs(r / 10.0 - 1.0) for r in rates.values()) if rates else float("nan")
    out.append(Result("replay 10× rate error (worst stream)", 100 * worst, "%",
                      reference="10 × recorded rate", ratio=100 * worst, goal=1.0,
                      higher_is_better=False, ratio_desc="% off",
                      extra={"rates": {k: round(v, 4) for k, v in rates.items()},
                             "lateness": j10}))
    return out


def run(quick: bool = False) -> list[Result]:
    from agent.export import ExportOptions, export

    seconds = 6.0 if quick else 24.0
    work = Path(tempfile.mkdtemp(prefix="edgecap-bench-export-"))
    out: list[Result] = []
    try:
        t = time.perf_counter()
        session = make_session(work / "rec", seconds)
        gen_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in session.glob("*.mcap"))
        # replay first: nothing the bench wrote is still being written back while it paces
        _settle_disk()
        replay = _replay_figures(session, seconds, quick)
        # exports: every figure writes into a fresh folder and nothing is deleted before
        # the end (see _wait_after_deletes); each starts with the disk written back
        waited = _wait_after_deletes()
        _settle_disk()
        copy_s = _copy_floor(session, work / "copy")
        for fmt in ("coco", "labelstudio", "cvat"):
            dst = work / f"out-{fmt}"
            _settle_disk()
            with _Steal() as steal:
                t, c = time.perf_counter(), _cpu_s()
                res = export(str(session), fmt, ExportOptions(out_dir=dst, progress=False))
                wall, cpu = time.perf_counter() - t, _cpu_s() - c
            files = [f for f in dst.rglob("*") if f.is_file()]
            written = sum(f.stat().st_size for f in files)
            sizes, links = _distinct(files)
            _settle_disk()
            floor_s = _file_floor(work / f"floor-{fmt}", sizes, links)
            _settle_disk()
            kfloor_s = _kernel_copy_floor(session, work / f"kfloor-{fmt}", sizes, links)
            linked = f" ({links} of them hard links)" if links else ""
            out.append(Result(f"export {fmt}", seconds / wall, "× real time",
                              reference=f"writing its {len(files)} files{linked} from memory "
                              f"{floor_s:.2f} s, copying them from the segments in the "
                              f"kernel {kfloor_s:.2f} s; copying the {size / 2**20:.0f} MiB "
                              f"session {copy_s:.2f} s", ratio=seconds / wall, goal=20.0,
                              ratio_desc="session s per wall s",
                              extra={"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                     "x_real_time_per_cpu_s": round(seconds / cpu, 1),
                                     "file_floor_s": round(floor_s, 2),
                                     "kernel_copy_floor_s": round(kfloor_s, 2),
                                     "vs_file_floor": round(wall / floor_s, 2),
                                     "vs_kernel_copy_floor": round(wall / kfloor_s, 2),
                                     "vs_copy": round(wall / copy_s, 2),
                                     "files": len(files), "hard_links": links,
                                     "written_mib": round(sum(sizes) / 2**20, 1),
                                     "exported_mib": round(written / 2**20, 1),
                                     "waited_for_deletes_s": round(waited, 1),
                                     "steal_pct": steal.pct,
                                     "load_1min": round(os.getloadavg()[0], 2),
                                     "summary": {k: v for k, v in res.items() if k != "out"}}))
        out += replay
        out.append(Result("reference session", seconds, "s",
                          reference=f"{size / 2**20:.0f} MiB, written in {gen_s:.1f} s",
                          extra={"segments": len(list(session.glob('*.mcap')))}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _LAST_DELETE.touch()
        _settle_disk()
    return out


if __name__ == "__main__":
    for r in run(quick=bool(os.environ.get("QUICK"))):
        print(r.as_dict())
