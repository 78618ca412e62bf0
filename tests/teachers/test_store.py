import signal
import subprocess
import sys
import time

import pytest

from kdistill.errors import KDistillError
from kdistill.teachers.store import ResponseStore, request_key

MSG = [{"role": "user", "content": "hi"}]


def test_key_ignores_order_and_model_field_but_not_parameters():
    a = request_key("chat", "m", {"messages": MSG, "temperature": 0.0, "max_tokens": 4})
    b = request_key("chat", "m", {"max_tokens": 4, "model": "m", "temperature": 0.0, "messages": MSG})
    assert a == b
    assert a != request_key("chat", "m", {"messages": MSG, "temperature": 0.5, "max_tokens": 4})
    assert a != request_key("chat", "other", {"messages": MSG, "temperature": 0.0, "max_tokens": 4})
    assert a != request_key("completions", "m", {"messages": MSG, "temperature": 0.0, "max_tokens": 4})
    assert a != request_key("chat", "m", {"messages": [{"role": "user", "content": "hi!"}], "temperature": 0.0,
                                          "max_tokens": 4})


def test_put_get_persist_and_stats(tmp_path):
    path = tmp_path / "r.sqlite"
    s = ResponseStore(path)
    assert s.journal_mode == "wal"
    k = request_key("chat", "m", {"messages": MSG})
    assert s.get(k) is None and k not in s
    resp = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    s.put(k, endpoint="chat", model="m", request={"messages": MSG}, response=resp, seconds=0.5)
    s.put(k, endpoint="chat", model="m", request={"messages": MSG}, response={"changed": 1})  # kept as first
    s.close()
    s2 = ResponseStore(path)
    assert s2.get(k) == resp and len(s2) == 1 and s2.keys() == [k]
    assert s2.stats() == {"rows": 1, "prompt_tokens": 3, "completion_tokens": 2, "latency_seconds_sum": 0.5}
    assert next(s2.rows())["request"] == {"messages": MSG}


def test_directory_path_is_a_clear_error(tmp_path):
    with pytest.raises(KDistillError, match="directory"):
        ResponseStore(tmp_path)


def test_not_sqlite_is_a_clear_error(tmp_path):
    p = tmp_path / "x.sqlite"
    p.write_text("this is not a database" * 100)
    with pytest.raises(KDistillError, match="cannot be opened"):
        ResponseStore(p)


WRITER = """
import sys
from kdistill.teachers.store import ResponseStore
s = ResponseStore(sys.argv[1])
i = 0
while True:
    s.put(f"k{i}", endpoint="chat", model="m", request={"i": i}, response={"i": i})
    print(i, flush=True)  # printed only after the commit returned
    i += 1
"""


def test_rows_committed_before_kill_9_survive(tmp_path):
    path = tmp_path / "r.sqlite"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    last = -1
    deadline = time.monotonic() + 30
    while last < 200 and time.monotonic() < deadline:
        last = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert last >= 200
    s = ResponseStore(path)
    for i in range(last + 1):  # every row whose put() returned is there, intact
        assert s.get(f"k{i}") == {"i": i}
