"""Rate limits: concurrent clients admitted within the token-bucket bound, denials carrying
RESOURCE_EXHAUSTED + RATE_LIMITED + RetryInfo, buckets per method and per client certificate,
two servers sharing one bucket in a real Redis, idle buckets expiring, a store that is down
refusing (UNAVAILABLE) or admitting calls as `on_store_error` says, config validation."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2 as kv
from prism.interfaces.keyvalue.v1 import keyvalue_basic_pb2_grpc as kv_grpc
from prism.interfaces.keyvalue.v1 import keyvalue_ttl_pb2 as ttl_pb

from plugins.runtime.context import CallContext
from plugins.runtime.errors import ResourceExhausted
from plugins.runtime.status import error_from_status, status_for
from prismctl.config import validate_config_data
from prismctl.registry import load_registry
from server.app import PrismServer, ServerOptions, create_server
from server.ratelimit import NAMESPACE, RateLimitInterceptor, bucket_key, refill
from server.tls import ServerTLS
from tests.security.conftest import PKI
from tests.security.test_tls import MEMSTORE, tls_channel
from tests.support.harness import SidecarProcess, error_details
from tests.support.servers import throwaway
from tests.support.wait import eventually

GET = "prism.interfaces.keyvalue.v1.KeyValueBasicService/Get"


def limited(store: dict[str, Any], *rules: dict[str, Any]) -> dict[str, Any]:
    return {**MEMSTORE, "rate_limits": {"store": store, "rules": list(rules)}}


@asynccontextmanager
async def servers(
    tmp_path: Path, config: dict[str, Any], count: int = 1, tls: ServerTLS | None = None
) -> AsyncIterator[list[PrismServer]]:
    async with AsyncExitStack() as stack:
        started = []
        for i in range(count):
            server = await create_server(
                ServerOptions(config=config, data_dir=tmp_path / f"data{i}", tls=tls, auth=False)
            )
            await server.start()
            stack.push_async_callback(server.stop, 0.5)
            started.append(server)
        yield started


def retry_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    trailing: Any = exc.trailing_metadata() or ()
    for key, value in trailing:
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info
    return None


def assert_rate_limited(exc: grpc.aio.AioRpcError, rate: float) -> None:
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    info, _ = error_details(exc)
    assert info is not None and info.reason == "RATE_LIMITED"
    assert info.metadata["method"] == GET
    retry = retry_info(exc)
    assert retry is not None
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    # a bucket never waits longer than one token's refill
    assert 0 < delay <= 1 / rate + 1e-6, delay


async def hammer(
    addresses: Sequence[str], clients_per_server: int, calls: int
) -> tuple[int, list[grpc.aio.AioRpcError], float]:
    """Every client (its own connection) makes `calls` Gets one after the other; all clients
    run at once. Returns (admitted, denials, seconds from first call to last answer)."""
    denied: list[grpc.aio.AioRpcError] = []
    admitted = 0

    async def client(address: str) -> None:
        nonlocal admitted
        async with grpc.aio.insecure_channel(address) as channel:
            stub = kv_grpc.KeyValueBasicServiceStub(channel)
            await channel.channel_ready()
            await start.wait()
            for _ in range(calls):
                try:
                    await stub.Get(kv.GetRequest(key="k"), timeout=10)
                    admitted += 1
                except grpc.aio.AioRpcError as exc:
                    denied.append(exc)

    start = asyncio.Event()
    tasks = [asyncio.create_task(client(a)) for a in addresses for _ in range(clients_per_server)]
    await asyncio.sleep(0)  # let every client connect before the clock starts
    await asyncio.gather(*(asyncio.sleep(0) for _ in tasks))
    began = time.time()
    start.set()
    await asyncio.gather(*tasks)
    return admitted, denied, time.time() - began


def within_bucket_bound(admitted: int, rate: float, burst: int, seconds: float) -> None:
    """A bucket admits its burst, then at most `rate` per second: never more than
    burst + rate·t in t seconds (+1 for a token completing at the window's edge)."""
    assert burst <= admitted <= burst + rate * seconds + 1, (admitted, seconds)


async def test_concurrent_clients_stay_within_the_bucket(tmp_path: Path) -> None:
    rate, burst = 20.0, 10
    config = limited({"backend": "memstore"}, {"method": GET, "rate": rate, "burst": burst})
    async with servers(tmp_path, config) as [server]:
        admitted, denied, seconds = await hammer([server.address], 8, 50)
        assert admitted + len(denied) == 400
        within_bucket_bound(admitted, rate, burst, seconds)
        assert denied
        for exc in denied:
            assert_rate_limited(exc, rate)
        # only Get is limited: Set and Exists go through while Get's bucket is empty
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = kv_grpc.KeyValueBasicServiceStub(channel)
            for _ in range(5):
                await stub.Set(kv.SetRequest(key="k", value=b"v"), timeout=10)
                await stub.Exists(kv.ExistsRequest(key="k"), timeout=10)


async def test_buckets_per_method_and_certificate_refill_and_health_exempt(
    tmp_path: Path, pki: PKI
) -> None:
    config = limited({"backend": "memstore"}, {"method": "*", "rate": 2, "burst": 1})
    tls = ServerTLS(pki.server.cert, pki.server.key, client_ca=pki.ca.cert)
    other = pki.ca.issue("client-b", server=False)
    async with servers(tmp_path, config, tls=tls) as [server]:
        a = tls_channel(server.address, pki, pki.client)
        b = tls_channel(server.address, pki, other)
        async with a, b:
            stub_a = kv_grpc.KeyValueBasicServiceStub(a)
            await stub_a.Get(kv.GetRequest(key="k"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub_a.Get(kv.GetRequest(key="k"), timeout=10)
            assert_rate_limited(err.value, 2.0)
            retry = retry_info(err.value)
            assert retry is not None
            # another method of the same caller, and the same method of another certificate
            await stub_a.Exists(kv.ExistsRequest(key="k"), timeout=10)
            await kv_grpc.KeyValueBasicServiceStub(b).Get(kv.GetRequest(key="k"), timeout=10)
            health = health_pb2_grpc.HealthStub(a)
            for _ in range(5):  # "*" does not reach load balancers' probes
                await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            # RetryInfo is exact: after the delay it named (plus clock slack) a token is there
            await asyncio.sleep(retry.retry_delay.ToTimedelta().total_seconds() + 0.02)
            await stub_a.Get(kv.GetRequest(key="k"), timeout=10)


async def test_two_servers_share_one_bucket_in_redis(tmp_path: Path) -> None:
    rate, burst = 2.0, 30
    with throwaway("redis") as redis:
        store = {"backend": "redis", "config": {"connection": redis.url}}
        config = limited(store, {"method": GET, "rate": rate, "burst": burst})
        async with servers(tmp_path, config, count=2) as pair:
            admitted, denied, seconds = await hammer([s.address for s in pair], 4, 50)
            assert admitted + len(denied) == 400
            # two separate buckets would admit at least 2 × burst
            within_bucket_bound(admitted, rate, burst, seconds)
            assert seconds < (burst - 1) / rate, "too slow to tell one bucket from two"
            for exc in denied:
                assert_rate_limited(exc, rate)
            limiter = pair[0].rate_limiter
            assert isinstance(limiter, RateLimitInterceptor)
            ttl = limiter.buckets.ttl
            assert ttl is not None
            key = bucket_key("peer:ipv4:127.0.0.1", "/" + GET)

            async def expiring() -> ttl_pb.GetTTLResponse | None:
                got = await ttl.get_ttl(ttl_pb.GetTTLRequest(key=key), CallContext(NAMESPACE))
                return got if got.state == ttl_pb.TTL_STATE_EXPIRING else None

            # the expiry is set off the call's path, shortly after the last admitted call
            got = await eventually(expiring, timeout=5)
            assert 0 < got.ttl.ToTimedelta().total_seconds() <= burst / rate + 1


@pytest.mark.parametrize("on_store_error", [None, "deny", "allow"])
async def test_store_down_denies_by_default_or_allows_when_configured(
    tmp_path: Path, on_store_error: str | None
) -> None:
    """The bucket store is a memstore sidecar, killed while the server runs: by default (and
    with `deny`) calls are refused UNAVAILABLE + RATE_LIMIT_STORE_UNAVAILABLE, with `allow` they
    go through; once the sidecar is back on its port, limits apply again."""
    sidecar = SidecarProcess("memstore", None, tmp_path / "sidecar")
    address = await sidecar.start()
    config = limited(
        {"backend": "memstore", "address": address}, {"method": GET, "rate": 0.01, "burst": 1}
    )
    if on_store_error is not None:
        config["rate_limits"]["on_store_error"] = on_store_error
    try:
        async with (
            servers(tmp_path, config) as [server],
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = kv_grpc.KeyValueBasicServiceStub(channel)
            await stub.Get(kv.GetRequest(key="k"), timeout=10)
            await sidecar.kill()
            for _ in range(3):  # with the store gone the empty bucket cannot refuse anything
                if on_store_error == "allow":
                    await stub.Get(kv.GetRequest(key="k"), timeout=10)
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Get(kv.GetRequest(key="k"), timeout=10)
                info, _ = error_details(err.value)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                assert info is not None and info.reason == "RATE_LIMIT_STORE_UNAVAILABLE"
                assert info.metadata["method"] == GET
            # methods no rule matches never ask the store
            await stub.Exists(kv.ExistsRequest(key="k"), timeout=10)
            await sidecar.start(f"127.0.0.1:{sidecar.port}")

            async def limited_again() -> bool:
                try:
                    await stub.Get(kv.GetRequest(key="k"), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    info, _ = error_details(exc)
                    return info is not None and info.reason == "RATE_LIMITED"
                return False

            # the restarted store is empty (a full bucket): one call, then limited again
            await eventually(limited_again, timeout=15, message="limits did not come back")
    finally:
        await sidecar.stop()


async def test_no_rate_limits_config_means_no_limiter(tmp_path: Path) -> None:
    async with servers(tmp_path, MEMSTORE) as [server]:
        assert server.rate_limiter is None


@pytest.mark.parametrize(
    ("rate_limits", "rule", "where"),
    [
        ({"store": {"backend": "nats"}, "rules": [{"method": "*", "rate": 1, "burst": 1}]},
         "MISSING_REQUIRED_INTERFACE", "rate_limits.store"),
        ({"store": {"backend": "memstore"}, "rules": [{"method": "*", "rate": 1, "burst": 0}]},
         "SCHEMA", "burst"),
        ({"store": {"backend": "memstore"}, "rules": [{"method": "*", "rate": 0, "burst": 1}]},
         "SCHEMA", "rate"),
        ({"store": {"backend": "memstore"}, "rules": []}, "SCHEMA", "rules"),
        ({"store": {"backend": "memstore", "tls": {"ca": "ca.pem"}},
          "rules": [{"method": "*", "rate": 1, "burst": 1}]}, "SCHEMA", "address"),
        ({"store": {"backend": "memstore"}, "on_store_error": "open",
          "rules": [{"method": "*", "rate": 1, "burst": 1}]}, "SCHEMA", "on_store_error"),
    ],
    ids=["store-without-cas", "burst-0", "rate-0", "no-rules", "tls-without-address",
         "on-store-error-bad"],
)  # fmt: skip
def test_rate_limits_config_is_validated(
    rate_limits: dict[str, Any], rule: str, where: str
) -> None:
    result = validate_config_data(
        {**MEMSTORE, "rate_limits": rate_limits}, "<test>", load_registry()
    )
    assert not result.ok
    found = [d for d in result.diagnostics if d.rule_id == rule]
    assert found, result.diagnostics
    assert any(where in d.message or where in str(d.location) for d in found), found


def test_refill_caps_at_burst_and_never_gains_from_clock_skew() -> None:
    def entry(tokens: float, stamp: float) -> kv.GetResponse:
        return kv.GetResponse(found=True, value=struct.pack("<dd", tokens, stamp), revision=1)

    assert refill(kv.GetResponse(found=False), 100.0, 2.0, 5) == (5.0, 100.0)
    assert refill(entry(0.5, 99.0), 100.0, 2.0, 5) == (2.5, 100.0)
    assert refill(entry(0.5, 10.0), 100.0, 2.0, 5) == (5.0, 100.0)
    # another replica's clock is ahead: no tokens for time that has not passed here
    assert refill(entry(0.5, 101.0), 100.0, 2.0, 5) == (0.5, 101.0)
    # an entry that is not a bucket (written by something else) counts as a full one
    assert refill(kv.GetResponse(found=True, value=b"junk", revision=1), 100.0, 2.0, 5) == (
        5.0,
        100.0,
    )


def test_retry_info_survives_a_sidecar_hop() -> None:
    """The status a sidecar sends becomes the same domain error in the server, delay included."""
    sent = ResourceExhausted("slow down", retry_delay=0.25, reason="RATE_LIMITED", method="m")
    status = status_for(sent)
    got = error_from_status(status.code, status.details, status.trailing_metadata)
    assert isinstance(got, ResourceExhausted)
    assert (got.reason, got.retry_delay, got.metadata["method"]) == ("RATE_LIMITED", 0.25, "m")


def test_bucket_keys_stay_within_the_key_limit() -> None:
    long_a, long_b = "cert:CN=" + "a" * 2000, "cert:CN=" + "b" * 2000
    assert bucket_key("peer:ipv4:10.0.0.1", "/" + GET) == f"/{GET}|peer:ipv4:10.0.0.1"
    keys = {bucket_key(who, "/" + GET) for who in (long_a, long_b)}
    assert len(keys) == 2
    assert all(len(k.encode()) <= 1024 for k in keys)
