"""pipeline.core.storage against a local folder, file:// and a real S3 server (moto_server via s3fs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.core.storage import Storage, StorageError


def _aws(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str = "testing") -> None:
    from s3_server import aws_env

    for k, v in aws_env(endpoint, key=key, secret=key).items():
        monkeypatch.setenv(k, v)


@pytest.fixture(params=["local", "file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    if request.param == "file":
        return Storage(f"file://{tmp_path / 'root'}")
    bucket = request.getfixturevalue("s3_bucket")
    _aws(monkeypatch, request.getfixturevalue("s3_endpoint"))
    return Storage(f"{bucket}/prefix")


def test_roundtrip(store: Storage, tmp_path: Path) -> None:
    store.check_access()
    src = tmp_path / "blob.bin"
    data = bytes(range(256)) * 4000
    src.write_bytes(data)
    info = store.put(src, "a/b/blob.bin")
    assert (info.path, info.size, info.sha256) == ("a/b/blob.bin", len(data), hashlib.sha256(data).hexdigest())
    got = store.get("a/b/blob.bin", tmp_path / "back" / "blob.bin")
    assert got == info and (tmp_path / "back" / "blob.bin").read_bytes() == data
    store.write_text("a/marker", "one")
    store.write_text("a/marker", "two")  # replaced whole
    assert store.read_text("a/marker") == "two"
    assert store.list("a") == ["b", "marker"] and store.list("nothing/here") == []
    assert store.find("a") == {"b/blob.bin": len(data), "marker": 3} and store.find("nothing") == {}
    assert store.exists("a/b/blob.bin") and not store.exists("a/missing")
    assert store.size("a/b/blob.bin") == len(data)
    with store.open("a/b/blob.bin") as f:
        assert f.read(4) == data[:4]
    child = store.child("a")
    assert child.read_text("marker") == "two" and child.url("marker") == store.url("a/marker")
    store.delete("a", recursive=True)
    store.delete("a/never-existed")
    assert not store.exists("a/marker")
    assert [n for n in store.list() if not n.startswith(".")] == []


def test_walk_is_dir_rename_and_of_file(store: Storage) -> None:
    for rel in ("t/a/1.jpg", "t/a/sub/2.jpg", "t/a-b/3.jpg", "t/.hidden/4.jpg", "t/top.txt"):
        store.write_bytes(rel, b"x")
    walked = store.walk("t")
    assert walked == sorted(walked) and walked[0] == ("", [".hidden", "a", "a-b"], ["top.txt"])
    assert [d for d, _, _ in walked] == ["", ".hidden", "a", "a-b", "a/sub"]  # sorted(os.walk(...)) order
    assert {d: f for d, _, f in walked}["a"] == ["1.jpg"]
    assert [d for d, _, _ in store.walk("t", skip_hidden=True)] == ["", "a", "a-b", "a/sub"]
    assert store.walk("nothing") == []
    assert store.is_dir("t/a") and not store.is_dir("t/top.txt") and not store.is_dir("nothing")
    store.rename("t/a", "u/a")
    assert not store.exists("t/a/1.jpg") and store.read_bytes("u/a/sub/2.jpg") == b"x"
    parent, name = Storage.of_file(store.url("u/a/1.jpg"))
    assert name == "1.jpg" and parent.url() == store.url("u/a") and parent.read_bytes(name) == b"x"
    store.delete("t", recursive=True)
    store.delete("u", recursive=True)


def test_of_file_takes_a_relative_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parent, name = Storage.of_file("lists/bad.txt")
    parent.write_text(name, "x")
    assert (tmp_path / "lists" / "bad.txt").read_text() == "x" and parent.root == str(tmp_path / "lists")


def test_missing_file_is_not_found(store: Storage) -> None:
    with pytest.raises(StorageError) as e:
        store.read_text("no/such/file")
    assert e.value.kind == "not_found" and "no/such/file" in str(e.value)


def test_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    s = Storage(str(tmp_path / "r"))
    s.write_text("x/latest", "step-1")
    s.put(__file__, "x/copy.py")
    assert sorted(p.name for p in (tmp_path / "r" / "x").iterdir()) == ["copy.py", "latest"]


def test_missing_bucket_names_uri(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _aws(monkeypatch, s3_endpoint)
    with pytest.raises(StorageError) as e:
        Storage("s3://no-such-bucket/ckpt").check_access()
    assert e.value.kind == "no_bucket" and "s3://no-such-bucket/ckpt" in str(e.value)
    assert "does not exist" in str(e.value) and not e.value.transient


def test_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_server import start_moto_server

    with start_moto_server(auth=True, log_dir=tmp_path) as url:
        _aws(monkeypatch, url, key="wrong")
        with pytest.raises(StorageError) as e:
            Storage("s3://bucket/ckpt").check_access()
    assert e.value.kind == "permission" and "AWS_ACCESS_KEY_ID" in str(e.value) and "s3://bucket/ckpt" in str(e.value)


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_server import _free_port

    _aws(monkeypatch, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(StorageError) as e:
        Storage("s3://bucket/ckpt").check_access()
    assert e.value.kind == "unreachable" and e.value.transient
    assert "AWS_ENDPOINT_URL" in str(e.value) and "s3://bucket/ckpt" in str(e.value)


def test_outage_then_recovery(s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3_server import outage

    _aws(monkeypatch, s3_endpoint)
    s = Storage(f"{s3_bucket}/p")
    s.write_text("k", "v")
    with outage(s3_endpoint):
        with pytest.raises(StorageError) as e:
            s.read_text("k")
        assert e.value.transient
    assert s.read_text("k") == "v"  # the data survived the outage


def test_bulk_write_without_fsync_is_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = Storage(str(tmp_path))
    store.write_bytes("train/n01/a.JPEG", b"x" * 100, durable=False)
    assert store.read_bytes("train/n01/a.JPEG") == b"x" * 100
    assert sorted(p.name for p in (tmp_path / "train" / "n01").iterdir()) == ["a.JPEG"]


def test_open_passes_the_callers_own_errors_through(store: Storage) -> None:
    store.write_text("f.txt", "data")
    with pytest.raises(KeyError, match="the caller's"), store.open("f.txt") as f:
        assert f.read() == b"data"
        raise KeyError("the caller's")
    with pytest.raises(StorageError) as e, store.open("missing.txt") as f:
        f.read()
    assert e.value.kind == "not_found" and store.url("missing.txt") in str(e.value)


def test_paused_server_is_cut_by_the_read_timeout_with_a_retry_line(
    s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import time

    from s3_server import paused

    _aws(monkeypatch, s3_endpoint)
    s = Storage(f"{s3_bucket}/p", read_timeout_s=1, connect_timeout_s=1, attempts=2)
    s.write_text("k", "v")
    with paused(s3_endpoint), caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        for op in (lambda: s.read_text("k"), lambda: s.write_text("k", "w")):  # a PUT too: no 100-continue wait
            caplog.clear()
            t0 = time.monotonic()
            with pytest.raises(StorageError) as e:
                op()
            took = time.monotonic() - t0
            assert e.value.transient and "timeout" in str(e.value).lower(), str(e.value)
            assert took < 30, took  # two 1 s timeouts and a pause, not a silent 120 s hang
            (line,) = [r.getMessage() for r in caplog.records]
            assert s.url("k") in line and "attempt 1 of 2 failed, trying again in" in line, line
    assert s.read_text("k") in ("v", "w")  # the server is back; a PUT it had received when paused may land
