"""metrics.jsonl and TensorBoard events (mixbct_jax.metrics_writer), read back with a plain event-file reader."""

import json
import pathlib
import struct

import pytest
from tensorboardX.proto import event_pb2

from mixbct_jax.metrics_writer import MetricsWriter


def read_events(logdir: pathlib.Path) -> list:
    """Every Event in the event files below ``logdir``, in file order (TFRecord framing: length, crc, data, crc)."""
    events = []
    for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_records_reach_both_sinks_with_wall_clock_time(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(2, {"loss": 3.5, "lr": 0.1, "finite": 1.0, "note": "text is kept in jsonl only"})
    writer.write(4, {"loss": 2.5, "lr": 0.05, "nan": float("nan")})
    writer.write(4, {"eval/new/old/mAP": 0.25})
    writer.tensorboard_only(4, {"final": {"retrieval synthetic": {"new/old": {"mAP %": 25.0}}}})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4] and all(r["time"] > 1.7e9 for r in records)
    assert "final" not in records[-1]  # the final evaluation goes to TensorBoard and eval/report.json only
    tb = scalars(tmp_path / "tensorboard")
    assert tb["loss"] == {2: 3.5, 4: 2.5} and tb["lr"][4] == pytest.approx(0.05)  # stored as float32
    assert tb["eval/new/old/mAP"] == {4: 0.25} and tb["final/retrieval_synthetic/new/old/mAP"] == {4: 25.0}
    assert "note" not in tb and "nan" not in tb and "time" not in tb and "step" not in tb


def test_a_resumed_run_hides_the_events_it_writes_again(tmp_path):
    first = MetricsWriter(tmp_path)
    for step in (2, 4, 6):
        first.write(step, {"loss": 1.0 / step})
    first.close()
    second = MetricsWriter(tmp_path, start_step=3)  # the run resumed from its step-3 checkpoint
    second.write(4, {"loss": 0.2})
    second.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # cut back to the restored step, then step 4 logged once more
    purges = [e for e in read_events(tmp_path / "tensorboard") if e.HasField("session_log")]
    assert [(e.step, e.session_log.status) for e in purges] == [(3, event_pb2.SessionLog.START)]


def test_other_processes_and_tensorboard_off_write_nothing_extra(tmp_path):
    MetricsWriter(tmp_path / "a", enabled=False).write(1, {"loss": 1.0})
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    writer = MetricsWriter(tmp_path / "b", tensorboard=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert (tmp_path / "b" / "metrics.jsonl").is_file() and not (tmp_path / "b" / "tensorboard").exists()
