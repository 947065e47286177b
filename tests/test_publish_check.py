"""`streamlme publish` refuses bad data at the first gate (issue 11 item 5): every row is decoded
as the consumer would before anything is sent; a misspelt column gets "did you mean"; a broker
that is down is named within its timeout.

The command runs as a user runs it (a subprocess), against the real broker of the fixtures; a
free port where nothing listens stands for a broker that is down.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from net_helpers import free_port
from stream_helpers import read_topic

from streamlme.events import EventDecoder
from streamlme.spec import ModelSpec
from streamlme.stream.publish import (
    BadRowsError,
    PublishError,
    check_events,
    numbered_csv_events,
    numbered_jsonl_events,
    send_events,
)

SPEC = ModelSpec(response="y", fixed=["1", "x"], random=["1"], group="g")
MODEL = """
[model]
response = "y"
fixed = ["1", "x"]
random = ["1"]
group = "g"
"""


def publish(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "STREAMLME_DEBUG"}
    return subprocess.run([sys.executable, "-m", "streamlme.cli", "publish", *args,
                           "--no-progress"], capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def config(tmp_path: Path, bootstrap: str, topic: str = "t", extra: str = "") -> Path:
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(MODEL) + f'[kafka]\nbootstrap_servers = "{bootstrap}"\n'
                    f'topic = "{topic}"\n' + extra)
    return path


def test_a_wrong_response_column_sends_nothing_unless_no_check(tmp_path, kafka_bootstrap,
                                                                kafka_topic) -> None:
    topic = kafka_topic(1)
    cfg = config(tmp_path, kafka_bootstrap, topic)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"g": g, "x": i, "Y": 2.0 * i}) + "\n"
                            for i, g in enumerate("aabbc")))
    result = publish(str(rows), "--config", str(cfg))
    assert result.returncode == 1, result.stderr
    line = one_line(result)
    assert "rows.jsonl: 5 of 5 rows would be dead-lettered by the consumer (missing_column 5)" in line
    assert "line 1: missing_column: y (did you mean 'Y'?); line 2: " in line
    assert "--no-check" in line and result.stdout == ""
    assert read_topic(kafka_bootstrap, topic, 1, timeout=3.0) == []

    sent = publish(str(rows), "--config", str(cfg), "--no-check")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == {"published": 5}
    messages = read_topic(kafka_bootstrap, topic, 5)
    assert sorted(m.value for m in messages) == sorted(rows.read_bytes().splitlines())


def test_a_good_file_is_checked_and_sent_whole(tmp_path, kafka_bootstrap, kafka_topic) -> None:
    topic = kafka_topic(2)
    rows = tmp_path / "rows.csv"
    rows.write_text("g,x,y,ts\n007,1,2.5,1700000000\n7,2,3.5,\nb,-1e99,1e-300,\n")
    result = publish(str(rows), "--config", str(config(tmp_path, kafka_bootstrap, topic)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"published": 3}
    values = [m.value for m in read_topic(kafka_bootstrap, topic, 3)]
    batch = EventDecoder(SPEC).decode(values)  # what the consumer will make of them
    assert batch.rejections == [] and sorted(batch.groups) == ["007", "7", "b"]


def test_a_misspelt_csv_column_is_refused_before_connecting(tmp_path) -> None:
    """The header names 'Y', then 'G': refused with both hints, at once, though no broker
    listens (the check runs before the producer connects)."""
    cfg = config(tmp_path, f"127.0.0.1:{free_port()}")
    rows = tmp_path / "rows.csv"
    rows.write_text("g,x,Y\na,1,2\n")
    started = time.monotonic()
    result = publish(str(rows), "--config", str(cfg))
    assert result.returncode == 1 and time.monotonic() - started < 8, result.stderr
    assert "no column(s) 'y' (did you mean 'Y'?)" in one_line(result)
    rows.write_text("G,x,y\na,1,2\n")
    line = one_line(publish(str(rows), "--config", str(cfg)))
    assert "no group column 'g' (did you mean 'G'?)" in line


def test_bad_csv_rows_are_named_by_line_as_the_consumer_would_reason(tmp_path) -> None:
    cfg = config(tmp_path, f"127.0.0.1:{free_port()}")
    rows = tmp_path / "rows.csv"
    rows.write_text('g,x,y,note\na,1,2,ok\n\nb,"1\n2",3,two lines\n"c\nd",4,5,\n,1,2,\n'
                    "e,1e200,1,\nf,1,2,\n")
    result = publish(str(rows), "--config", str(cfg))
    assert result.returncode == 1, result.stderr
    line = one_line(result)
    # line 3 is blank; the quoted cells span lines 4-5 and 6-7 (a group id with a newline is
    # a group id like any other)
    assert ("rows.csv: 3 of 6 rows would be dead-lettered by the consumer (non_numeric 1, "
            "bad_group 1, overflow 1), nothing was sent; line 4: non_numeric: x (got str); "
            "line 8: bad_group: empty; line 9: overflow: x is 1e+200") in line


def test_check_events_counts_every_bad_row_and_shows_the_first_five() -> None:
    lines = [b'{"g": "a", "x": 1, "y": 2}', b"", b"[1]"] + [b'{"g": "a", "x": 1}'] * 7
    events = list(numbered_jsonl_events(io.BytesIO(b"\n".join(lines) + b"\n"), "g"))
    assert [n for n, _, _ in events] == [1, 3, 4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(BadRowsError) as info:
        check_events(events, EventDecoder(SPEC), "f.jsonl")
    message = str(info.value)
    assert message.startswith("f.jsonl: 8 of 9 rows would be dead-lettered by the consumer "
                              "(missing_column 7, not_an_object 1), nothing was sent; "
                              "line 3: not_an_object: got array; line 4: missing_column: y; ")
    assert "line 7: missing_column: y; ...; fix the file" in message and "line 8" not in message
    assert "\n" not in message
    assert check_events(events[:1], EventDecoder(SPEC)) == 1


def test_check_events_uses_the_decoders_limits() -> None:
    now = time.time()
    text = f"g,x,y,ts,weight\na,1,2,{now + 600:.0f},1\nb,1,2,{now + 7200:.0f},1\nc,1,2,,1e300\n"
    events = list(numbered_csv_events(io.StringIO(text), "g", as_text=["g"],
                                      required=["g", "x", "y"]))
    with pytest.raises(BadRowsError, match=r"line 3: bad_ts: .* more than max_future \(3600 s\)"
                                           r"; line 4: overflow: weight is 1e\+300"):
        check_events(events, EventDecoder(SPEC))
    assert check_events(events[:1], EventDecoder(SPEC)) == 1
    with pytest.raises(BadRowsError, match="line 2: bad_ts"):
        check_events(events[:1], EventDecoder(SPEC, max_future=60))


def test_kafka_down_is_one_line_naming_the_address_within_about_10_s(tmp_path) -> None:
    """kafka-python's own defaults waited 30 s and printed 55 lines of traceback."""
    port = free_port()
    rows = tmp_path / "rows.csv"
    rows.write_text("g,x,y\na,1,2\n")
    started = time.monotonic()
    result = publish(str(rows), "--config", str(config(tmp_path, f"127.0.0.1:{port}")))
    elapsed = time.monotonic() - started
    assert result.returncode == 4, result.stderr
    assert f"Kafka at 127.0.0.1:{port} did not answer" in one_line(result)
    assert elapsed < 20, elapsed  # ~10 s of bootstrap timeout plus the interpreter's start


def test_send_events_names_a_broker_that_is_down() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(PublishError, match=rf"^Kafka at 127.0.0.1:{port} did not answer .*"
                                           "start the broker or fix"):
        send_events([(b"a", b"{}")], "t", {"bootstrap_servers": [f"127.0.0.1:{port}"],
                                           "bootstrap_timeout_ms": 1500}, progress=False)
    assert time.monotonic() - started < 8
