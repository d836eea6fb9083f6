"""One writer at a time in a data folder: a live holder refuses a second writer by name; a lock left
by a dead process is taken over; a writer calling another writer in the same process nests."""

import json
import os
import socket
import subprocess
import sys

import pytest

from medusa_lib.files import LOCK_FILE, folder_lock


def holder_lock(folder, pid):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "what": "self-distillation",
                                                "command": "make run", "since": "2026-12-05 06:00:00"}))


def test_a_second_writer_is_refused_naming_the_holder_and_nothing_is_touched(tmp_path):
    from medusa_lib.data import self_distill
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        folder = tmp_path / "prepared"
        holder_lock(folder, live.pid)
        out = folder / "distilled_train.jsonl"
        out.write_text('{"id": "a", "messages": []}\n{"id": "b", "mess')  # the holder is mid-append
        before = out.read_bytes()
        with pytest.raises(RuntimeError, match=rf"being written by another process: pid {live.pid} .*self-distillation "
                                               rf"\(make run\), since 2026-12-05 06:00:00.*Wait for it"):
            self_distill(None, None, [{"id": "c", "messages": [{"role": "user", "content": "hi"}]}], out, 8, 2)
        assert out.read_bytes() == before  # the live writer's half row was not cut
    finally:
        live.kill()
        live.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder_lock(tmp_path, dead.pid)
    with folder_lock(tmp_path, "training"):
        mine = json.loads((tmp_path / LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid() and mine["what"] == "training"
        with folder_lock(tmp_path, "export"):  # the same process again: nested, not refused
            pass
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()
    (tmp_path / LOCK_FILE).write_text("{not json")  # a holder that died while writing its lock
    with folder_lock(tmp_path, "training"):
        pass


def test_an_export_in_progress_refuses_a_second_export_to_the_same_folder(tiny_llama, tmp_path):
    from medusa_lib.export import export_medusa
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        holder_lock(tmp_path, live.pid)
        with pytest.raises(RuntimeError, match=f"pid {live.pid}"):
            export_medusa(tiny_llama, None, tmp_path / "onnx", topk=4)
        assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.partial").exists()
    finally:
        live.kill()
        live.wait()
