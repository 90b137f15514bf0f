"""The MLflow outbox on a real sqlite store and against an address where no server answers: order,
records the store refuses, records kept for later and sent by the next submit."""

from __future__ import annotations

import json
import re
import socket

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import mlflow_outbox
from pipeline.mlflow_outbox import OUTBOX, RECORDS, Outbox, save, send, send_kept


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    return uri, client, run_id


@pytest.fixture
def dead_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after ~4 min
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _metrics(step, **values):
    return {"kind": "metrics", "metrics": values, "step": step, "timestamp": 1000 + step}


def test_records_arrive_in_order_and_a_refused_one_does_not_block_the_rest(store, tmp_path):
    uri, client, run_id = store
    (tmp_path / "a.txt").write_text("hello")
    box = Outbox(client, run_id, uri, retry_s=0.1)
    for step in range(1, 2500):  # more than one request's worth of metrics, merged in order
        box.put(_metrics(step, loss=1.0 / step))
    box.put({"kind": "artifact", "path": str(tmp_path / "gone.txt"), "artifact_path": None})
    box.put({"kind": "tags", "tags": {"t": "v"}})
    box.put({"kind": "artifact", "path": str(tmp_path / "a.txt"), "artifact_path": "files"})
    box.put({"kind": "image", "image": Image.new("RGB", (4, 4)), "key": "grid", "step": 3,
             "timestamp": 5})
    box.put({"kind": "terminate", "status": "KILLED", "end_time": 9999})
    assert box.flush(timeout=120)
    assert box.close(timeout=1) == []
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 2500))
    assert history[9].value == pytest.approx(0.1) and history[9].timestamp == 1010
    run = client.get_run(run_id)
    assert run.data.tags["t"] == "v" and run.info.status == "KILLED" and run.info.end_time == 9999
    assert [a.path for a in client.list_artifacts(run_id, "files")] == ["files/a.txt"]
    assert any("grid" in a.path for a in client.list_artifacts(run_id, "images"))


def test_an_image_sent_again_is_logged_once(store):
    """A re-sent image record (its answer lost in an outage, or kept by a killed stage) does not
    add a second image at its step; another step or another logging of the step does."""
    uri, client, run_id = store
    record = {"kind": "image", "image": Image.new("RGB", (4, 4)), "key": "samples/grid", "step": 7,
              "timestamp": 11}
    for again in (record, record, {**record, "step": 70}, {**record, "step": 8}, {**record, "timestamp": 12}):
        send(client, run_id, [again])
    pngs = sorted(a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png"))
    assert sorted(re.sub(r"\+[0-9a-f-]{36}\.png$", "", p) for p in pngs) == sorted([
        "images/samples~grid+step+70+timestamp+11", "images/samples~grid+step+7+timestamp+11",
        "images/samples~grid+step+7+timestamp+12", "images/samples~grid+step+8+timestamp+11"])


def test_an_unreachable_server_keeps_every_record(dead_uri, tmp_path):
    box = Outbox(MlflowClient(dead_uri), "run0", dead_uri, retry_s=0.1)
    records = [_metrics(1, loss=2.0), {"kind": "image", "image": Image.new("RGB", (4, 4), "red"),
                                       "key": "grid", "step": 1, "timestamp": 7},
               {"kind": "terminate", "status": "FINISHED", "end_time": 5}]
    for record in records:
        box.put(record)
    left = box.close(timeout=1.0)
    assert left == records  # the one in flight too
    saved = save(tmp_path / "stage", "run0", dead_uri, left)
    kept = json.loads((saved / RECORDS).read_text())
    assert kept["run_id"] == "run0" and kept["tracking_uri"] == dead_uri
    assert [r["kind"] for r in kept["records"]] == ["metrics", "image", "terminate"]
    with Image.open(saved / "images" / kept["records"][1]["file"]) as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)
    assert mlflow_outbox.describe(kept["records"]) == "3 records (metrics up to step 1, final status FINISHED)"

    # still unreachable: the next submit puts them back untouched
    lines = send_kept(tmp_path, dead_uri)
    assert len(lines) == 1 and "still does not take them" in lines[0]
    assert json.loads((saved / RECORDS).read_text())["records"] == kept["records"]
    assert not list(tmp_path.glob(f"stage/{OUTBOX}.sending-*"))


def test_kept_records_are_sent_once_by_the_next_submit_and_older_ones_go_first(store, tmp_path):
    uri, client, run_id = store
    stage = tmp_path / "exp" / "train_top_prior"
    save(stage, run_id, uri, [_metrics(1, loss=3.0), {"kind": "image", "image": Image.new("RGB", (4, 4)),
                                                      "key": "grid", "step": 1, "timestamp": 3}])
    # a failed send claimed these, and the stage kept newer ones meanwhile: put back before them
    claimed = stage / f"{OUTBOX}.sending-1"
    (stage / OUTBOX).rename(claimed)
    older = json.loads((claimed / RECORDS).read_text())
    save(stage, run_id, uri, [_metrics(2, loss=2.0), {"kind": "terminate", "status": "FINISHED", "end_time": 8}])
    mlflow_outbox._put_back(claimed, stage / OUTBOX, older, older["records"])
    assert not claimed.exists()
    merged = json.loads((stage / OUTBOX / RECORDS).read_text())["records"]
    assert [r["kind"] for r in merged] == ["metrics", "image", "metrics", "terminate"]
    assert (stage / OUTBOX / "images" / merged[1]["file"]).exists()
    # another experiment's server is not this one's business
    save(tmp_path / "exp" / "sample", "other", "http://elsewhere:5000", [_metrics(1, x=1.0)])

    lines = send_kept(tmp_path / "exp", uri)
    assert lines == ["train_top_prior: sent 4 records (metrics up to step 2, final status FINISHED) "
                     "kept since MLflow was unreachable"]
    assert not (stage / OUTBOX).exists() and (tmp_path / "exp" / "sample" / OUTBOX).exists()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert any("grid" in a.path for a in client.list_artifacts(run_id, "images"))
    assert send_kept(tmp_path / "exp", uri) == []  # nothing is sent twice
