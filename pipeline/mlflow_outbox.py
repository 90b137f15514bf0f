"""Delivery of one MLflow run's records from a background thread, held through a server outage.

A stage never waits on the tracking server: metrics, tags, images, artifacts and the run's final
status are queued here and sent in order by one thread. When the server does not answer (a
restart, a network cut, a locked sqlite file) the records stay queued and are retried; the stage
goes on. Whatever is still unsent when the stage ends is saved in ``<stage_dir>/mlflow_outbox/``
(images as PNG files) and sent by the next ``submit`` of the experiment. Re-sending a record is
harmless: MLflow keeps one copy of a metric point or tag, an artifact overwrites itself, and a
stepped image already there is not logged again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pipeline import atomic

log = logging.getLogger(__name__)
OUTBOX = "mlflow_outbox"
RECORDS = "records.json"
_MAX_METRICS = 1000  # MLflow's per-request limit on metrics in one log_batch


def reachable(uri: str, timeout: float = 5.0) -> str | None:
    """None when the tracking store answers, else why not. Only a server can be away; asking it
    directly avoids MLflow's own retries (about 4 minutes for a server that is down)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except OSError as e:
        return str(getattr(e, "reason", e))
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


def metrics_record(metrics: dict[str, float], step: int | None) -> dict[str, Any]:
    """A queued metrics record, stamped with the time it was logged (MLflow keeps that time)."""
    return {"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
            "timestamp": now_ms()}


def _permanent(error: Exception) -> bool:
    """A record the server refuses (bad value, deleted run, file gone) will never go through:
    drop it instead of blocking every record behind it. Anything else is worth retrying."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, FileNotFoundError):
        return True
    if isinstance(error, MlflowException):
        # a bad value, a deleted run, a duplicate, too large; not 401/403 (a token being renewed),
        # 408 or 429, which pass
        return error.get_http_status_code() in (400, 404, 409, 413, 422)
    return False


def send(client: Any, run_id: str, records: list[dict[str, Any]], images: Path | None = None) -> None:
    """Deliver ``records`` (consecutive metrics merged into one request) or raise; a kept image
    record names its PNG file in ``images``."""
    from mlflow.entities import Metric, RunTag

    if records[0]["kind"] == "metrics":
        metrics = [Metric(k, float(v), r["timestamp"], r["step"] or 0)
                   for r in records for k, v in r["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
        return
    (record,) = records
    kind = record["kind"]
    if kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, record["path"], artifact_path=record["artifact_path"])
    elif kind == "image":
        image = record.get("image")
        if image is None:  # saved by an earlier execution
            from PIL import Image

            with Image.open(images / record["file"]) as f:
                image = f.copy()
        if record["step"] is None:
            client.log_image(run_id, image, artifact_file=record["key"])
        elif not _image_logged(client, run_id, record):
            client.log_image(run_id, image, key=record["key"], step=record["step"],
                             timestamp=record["timestamp"])
    elif kind == "terminate":
        client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown MLflow record kind {kind!r}")


def _image_logged(client: Any, run_id: str, record: dict[str, Any]) -> bool:
    """Whether the run holds this stepped image already. MLflow names its file by key, step and
    timestamp, then a random uuid: a re-send (an answer lost in an outage, a record kept by a killed
    stage) would add a second image at the step instead of overwriting the first."""
    key = "[~#]".join(re.escape(part) for part in record["key"].split("/"))  # MLflow's "/" stand-ins
    name = re.compile(rf"{key}(?P<s>[+%])step(?P=s){record['step']}(?P=s)timestamp(?P=s){record['timestamp']}"
                      r"(?P=s)[^/]*\.png")
    return any(name.fullmatch(a.path.rsplit("/", 1)[-1]) for a in client.list_artifacts(run_id, "images"))


def _next_batch(queue: deque) -> list[dict[str, Any]]:
    head = queue[0]
    if head["kind"] != "metrics":
        return [head]
    batch, count = [], 0
    for record in queue:
        if record["kind"] != "metrics" or count + len(record["metrics"]) > _MAX_METRICS:
            break
        batch.append(record)
        count += len(record["metrics"])
    return batch or [head]


class Outbox:
    """Sends one run's records in order from a daemon thread; ``put`` never blocks."""

    def __init__(self, client: Any, run_id: str, uri: str, retry_s: float = 30.0,
                 images: Path | None = None):
        self.client, self.run_id, self.uri, self.retry_s = client, run_id, uri, retry_s
        self.images = images  # where kept image records' PNG files are
        self.last_error = ""
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self.failing_since: float | None = None  # when the current outage began
        self._sending_since: float | None = None  # when the request in flight was sent
        self._thread = threading.Thread(target=self._deliver, daemon=True, name="mlflow-outbox")
        self._thread.start()
        threading.Thread(target=self._watch, daemon=True, name="mlflow-outbox-watch").start()

    def put(self, record: dict[str, Any]) -> None:
        with self._cond:
            self._queue.append(record)
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every record is delivered (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout=timeout)

    def close(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for delivery while the server is there (a large artifact takes its time), or up to
        ``timeout`` seconds once it is not; stop the thread and return what was not delivered (the
        record in flight included: it may still arrive, and re-sending it is harmless)."""
        deadline = time.time() + timeout
        while not self.flush(min(5.0, max(0.0, deadline - time.time()))):
            if self.failing_since is None and reachable(self.uri) is None:
                deadline = time.time() + timeout
            elif time.time() >= deadline:
                break
        return self.abandon()

    def abandon(self) -> list[dict[str, Any]]:
        """Stop at once and return what was not delivered."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            return list(self._queue)

    def _deliver(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop)
                if self._stop:
                    return
                batch = _next_batch(self._queue)
            self._sending_since = time.time()
            try:
                send(self.client, self.run_id, batch, self.images)
            except Exception as e:  # noqa: BLE001 - any failure: keep the records, the stage goes on
                self._sending_since = None
                self.last_error = str(e)[:300]
                if _permanent(e):
                    log.warning("MLflow refused a %s record, dropped: %s", batch[0]["kind"], e)
                else:
                    failures += 1
                    self._outage_began(str(e))
                    with self._cond:  # back off, but wake up to stop
                        self._cond.wait_for(lambda: self._stop,
                                            timeout=min(self.retry_s, 2.0 ** min(failures, 10)))
                    continue
            self._sending_since = None
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                held = len(self._queue)
                self._cond.notify_all()
            if self.failing_since is not None:
                log.info("MLflow at %s takes records again after %.0f s of outage (%d more queued)",
                         self.uri, time.time() - self.failing_since, held)
                self.failing_since, failures = None, 0

    def _outage_began(self, why: str) -> None:
        with self._cond:
            if self.failing_since is not None:
                return
            self.failing_since = time.time()
        log.warning("MLflow at %s does not take records (%s): holding them and retrying; the stage "
                    "goes on", self.uri, why[:300])

    def _watch(self, every: float = 5.0, patience: float = 10.0) -> None:
        """MLflow retries a request to a server that is down for ~4 minutes before it fails: say so
        when it happens, not 4 minutes later, by asking /health about a request that takes long."""
        while True:
            with self._cond:
                if self._cond.wait_for(lambda: self._stop, timeout=every):
                    return
            since = self._sending_since
            if since is not None and time.time() - since > patience and self.failing_since is None:
                away = reachable(self.uri)
                if away and self._sending_since == since:
                    self._outage_began(f"{away}; a request has waited {time.time() - since:.0f} s")


def save(stage_dir: Path, run_id: str, uri: str, records: list[dict[str, Any]],
         name: str = OUTBOX) -> Path:
    """Keep undelivered records in ``<stage_dir>/<name>/`` (after any kept before); ``name`` is
    ``mlflow_outbox``, for another node's system metrics ``mlflow_outbox-<node>``, for an array
    task that completed the stage ``mlflow_outbox-task<i>``."""
    box = Path(stage_dir) / name
    (box / "images").mkdir(parents=True, exist_ok=True)
    kept = _load(box)["records"] if (box / RECORDS).exists() else []
    for record in records:
        record = dict(record)
        if record["kind"] == "image" and "image" in record:
            record["file"] = f"{len(kept):06d}-{os.getpid()}.png"
            record.pop("image").save(box / "images" / record["file"])
        kept.append(record)
    atomic.write_json(box / RECORDS, {"run_id": run_id, "tracking_uri": uri, "records": kept})
    return box


def _load(box: Path) -> dict[str, Any]:
    return json.loads((box / RECORDS).read_text())


def describe(records: list[dict[str, Any]]) -> str:
    """``"412 records (metrics up to step 5000, final status FINISHED)"``"""
    steps = [r["step"] for r in records if r["kind"] == "metrics" and r["step"] is not None]
    ends = [r["status"] for r in records if r["kind"] == "terminate"]
    extra = ([f"metrics up to step {max(steps)}"] if steps else []) + (
        [f"final status {ends[-1]}"] if ends else [])
    return f"{len(records)} records" + (f" ({', '.join(extra)})" if extra else "")


def send_kept(experiment_dir: Path, uri: str, wait_s: float = 5.0) -> list[str]:
    """Send the records kept by earlier executions of any stage of the experiment that logged to
    ``uri`` (giving up once the server has not answered for ``wait_s``); one line per outbox. A
    kept outbox is claimed by renaming it, so two stages starting together never send it twice;
    what does not go is put back for the next try."""
    from mlflow.tracking import MlflowClient

    lines = []
    for box in sorted(Path(experiment_dir).glob(f"*/{OUTBOX}*")):
        if ".sending-" in box.name or not (box / RECORDS).exists() or _load(box)["tracking_uri"] != uri:
            continue
        of = box.name[len(OUTBOX) + 1:]  # '', a node's name, or task<i>: a completing array task's
        label = box.parent.name + (f" (array task {of[4:]})" if re.fullmatch(r"task\d+", of) else
                                   f" (node {of})" if of else "")
        claimed = box.with_name(f"{box.name}.sending-{os.getpid()}")
        try:
            box.rename(claimed)
        except OSError:  # another process claimed it first
            continue
        kept = _load(claimed)
        outbox = Outbox(MlflowClient(uri), kept["run_id"], uri, retry_s=1.0, images=claimed / "images")
        for record in kept["records"]:
            outbox.put(record)
        left = outbox.close(wait_s)
        if left:
            _put_back(claimed, box, kept, left)
            lines.append(f"{label}: {describe(left)} kept in {box}; MLflow still "
                         f"does not take them ({outbox.last_error})")
            continue
        shutil.rmtree(claimed)
        lines.append(f"{label}: sent {describe(kept['records'])} kept since MLflow was "
                     f"unreachable")
    return lines


def _put_back(claimed: Path, box: Path, kept: dict[str, Any], records: list[dict[str, Any]]) -> None:
    atomic.write_json(claimed / RECORDS, {**kept, "records": records})
    if not box.exists():
        claimed.rename(box)
        return
    # the stage kept more records meanwhile: these go first, their images beside the newer ones
    for record in records:
        if record["kind"] == "image" and "file" in record:
            (claimed / "images" / record["file"]).rename(box / "images" / f"earlier-{record['file']}")
            record["file"] = f"earlier-{record['file']}"
    newer = _load(box)
    atomic.write_json(box / RECORDS, {**newer, "records": records + newer["records"]})
    shutil.rmtree(claimed)
