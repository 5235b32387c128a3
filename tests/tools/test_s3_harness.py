"""The S3 test harness itself: the delaying forwarder in front of moto_server (a request pays the round trip,
connections do not wait on each other, bytes arrive whole and in order) and the request counts moto records."""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse

import pytest
from s3_server import S3_DELAY_S, count_requests, direct_url, start_moto_server


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),
    )


def _round_trip(endpoint: str, key: str) -> tuple[float, bytes]:
    """One GET of s3://bkt/<key> (presigned: no signing inside the timing) on a connection opened beforehand."""
    url = _client(endpoint).generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": key})
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.connect()
    try:
        t0 = time.perf_counter()
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        body = response.read()
        took = time.perf_counter() - t0
        assert response.status == 200, (response.status, body[:200])
        return took, body
    finally:
        conn.close()


@pytest.fixture(scope="module")
def delayed(tmp_path_factory):
    with start_moto_server(log_dir=tmp_path_factory.mktemp("moto"), delay_s=S3_DELAY_S) as url:
        s3 = _client(direct_url(url))
        s3.create_bucket(Bucket="bkt")
        s3.put_object(Bucket="bkt", Key="small", Body=b"x" * 100)
        s3.put_object(Bucket="bkt", Key="big", Body=os.urandom(6 << 20))
        yield url


def test_a_request_through_the_delay_pays_the_round_trip(delayed):
    took, body = _round_trip(delayed, "small")
    assert body == b"x" * 100
    assert took >= 2 * S3_DELAY_S, f"{took * 1000:.1f} ms for a round trip through a {S3_DELAY_S * 1000} ms delay"
    direct, _ = _round_trip(direct_url(delayed), "small")
    assert direct < took


def test_bytes_arrive_whole_and_in_order(delayed):
    direct = _client(direct_url(delayed)).get_object(Bucket="bkt", Key="big")["Body"].read()
    through = _client(delayed).get_object(Bucket="bkt", Key="big")["Body"].read()
    assert through == direct and len(through) == 6 << 20


def test_connections_do_not_wait_on_each_other(tmp_path):
    delay, n = 0.25, 8  # a long delay, so that the bound below is generous against the machine's load
    with start_moto_server(log_dir=tmp_path, delay_s=delay) as url:
        s3 = _client(direct_url(url))
        s3.create_bucket(Bucket="bkt")
        s3.put_object(Bucket="bkt", Key="small", Body=b"x")
        took: list[float] = []
        threads = [threading.Thread(target=lambda: took.append(_round_trip(url, "small")[0])) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    assert len(took) == n and min(took) >= 2 * delay
    assert wall < n * 2 * delay / 2, f"{n} concurrent requests took {wall:.2f} s: the forwarder serialised them"


def test_requests_are_counted_at_the_server(delayed):
    s3 = _client(delayed)
    with count_requests(delayed) as log:
        for _ in range(3):
            s3.get_object(Bucket="bkt", Key="small")["Body"].read()
        s3.head_object(Bucket="bkt", Key="small")
        s3.get_object(Bucket="bkt", Key="big", Range="bytes=0-99")["Body"].read()
    requests = log.requests()
    assert [(r.method, r.path) for r in requests] == [("GET", "/bkt/small")] * 3 + [
        ("HEAD", "/bkt/small"),
        ("GET", "/bkt/big"),
    ]
    assert requests[-1].range == "bytes=0-99" and requests[0].range == ""
    assert log.count(method="GET") == 4 and log.count(prefix="/bkt/small") == 4
    s3.get_object(Bucket="bkt", Key="small")  # after the block: not counted
    assert len(log.requests()) == 5
    with count_requests(delayed) as again:  # a new block starts from zero
        s3.list_objects_v2(Bucket="bkt")
    assert [r.method for r in again.requests()] == ["GET"] and again.requests()[0].query.startswith("list-type=2")


def test_a_delayed_endpoint_has_outages_too(tmp_path):
    from s3_server import outage

    with start_moto_server(log_dir=tmp_path, delay_s=S3_DELAY_S) as url:
        s3 = _client(direct_url(url))
        s3.create_bucket(Bucket="bkt")
        s3.put_object(Bucket="bkt", Key="small", Body=b"x")
        assert _round_trip(url, "small")[1] == b"x"
        with outage(url):
            with pytest.raises(ConnectionRefusedError):
                _round_trip(url, "small")
        assert _round_trip(url, "small")[1] == b"x"  # the same port again, the data intact
