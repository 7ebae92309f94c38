"""keyvalue_scan: ordering, literal prefixes, keyset pagination, page-size rules, Count."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prism.interfaces.keyvalue.v1 import keyvalue_scan_pb2 as pb
from prism.interfaces.keyvalue.v1.keyvalue_scan_pb2_grpc import KeyValueScanServiceStub

from prismctl.conformance.core import Target, case, check, equal, expect_invalid
from prismctl.conformance.keyvalue_basic import put, put_many, remove

if TYPE_CHECKING:
    from prism.interfaces.keyvalue.v1.keyvalue_scan_pb2_grpc import KeyValueScanServiceAsyncStub

REQUIRES = ("keyvalue_basic",)


def stub(t: Target) -> KeyValueScanServiceAsyncStub:
    return KeyValueScanServiceStub(t.channel)


async def scan_page(t: Target, prefix: str, page_size: int = 0, token: str = "") -> pb.ScanResponse:
    response: pb.ScanResponse = await stub(t).Scan(
        pb.ScanRequest(prefix=prefix, page_size=page_size, page_token=token)
    )
    return response


async def scan_keys_all(t: Target, prefix: str, page_size: int = 0) -> list[str]:
    """Every key under `prefix` via ScanKeys, following page tokens."""
    keys: list[str] = []
    token = ""
    while True:
        page: pb.ScanKeysResponse = await stub(t).ScanKeys(
            pb.ScanKeysRequest(prefix=prefix, page_size=page_size, page_token=token)
        )
        keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            return keys


async def count(t: Target, prefix: str) -> int:
    response: pb.CountResponse = await stub(t).Count(pb.CountRequest(prefix=prefix))
    return response.count


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


@case("keyvalue_scan", requires=REQUIRES)
async def scan_order_values_and_revisions(t: Target) -> None:
    """Scan returns exactly the keys under the prefix, ascending by UTF-8 bytes, with values."""
    names = ["b", "a", "B", "é", "z", "a/1", "a0", "日本"]
    revisions = {}
    for n in names:
        revisions[t.key(n)] = await put(t, t.key(n), n.encode())
    await put(t, t.prefix[:-1] + "+outside", b"x")  # shares all but the last prefix byte
    page = await scan_page(t, t.prefix)
    got = [e.key for e in page.entries]
    equal(got, utf8_sorted([t.key(n) for n in names]), "Scan keys (UTF-8 byte order)")
    for e in page.entries:
        equal(e.value, e.key.removeprefix(t.prefix).encode(), f"Scan value of {e.key!r}")
        equal(e.revision, revisions[e.key], f"Scan revision of {e.key!r} (same as Set's)")
    equal(page.next_page_token, "", "next_page_token of a complete scan")
    equal(await scan_keys_all(t, t.prefix), got, "ScanKeys keys")


@case("keyvalue_scan", requires=REQUIRES)
async def prefix_is_literal(t: Target) -> None:
    """`%`, `_`, `*` and `\\` in a prefix match only themselves (no LIKE/glob leaks)."""
    names = ["a%b", "a%", "axb", "a_b", "a_", "aXb", "a*b", "ayyb", "a\\b", "a\\", "ab"]
    await put_many(t, [t.key(n) for n in names])
    expectations = {
        "a%": ["a%", "a%b"],
        "a_": ["a_", "a_b"],
        "a*": ["a*b"],
        "a\\": ["a\\", "a\\b"],
        "a_b": ["a_b"],
        "%": [],
        "_": [],
    }
    for prefix, expected in expectations.items():
        want = utf8_sorted([t.key(n) for n in expected])
        page = await scan_page(t, t.key(prefix))
        equal([e.key for e in page.entries], want, f"Scan with prefix {prefix!r}")
        equal(await scan_keys_all(t, t.key(prefix)), want, f"ScanKeys with prefix {prefix!r}")
        equal(await count(t, t.key(prefix)), len(want), f"Count with prefix {prefix!r}")


@case("keyvalue_scan", requires=REQUIRES)
async def count_follows_writes(t: Target) -> None:
    """Count is the number of keys under the prefix and follows Set and Delete."""
    equal(await count(t, t.prefix), 0, "Count of an unused prefix")
    await put_many(t, [t.key(f"{i:02d}") for i in range(12)])
    equal(await count(t, t.prefix), 12, "Count after 12 Sets")
    await put(t, t.key("00"), b"again")
    equal(await count(t, t.prefix), 12, "Count after overwriting a key")
    await remove(t, t.key("05"))
    equal(await count(t, t.prefix), 11, "Count after a Delete")
    equal(await count(t, t.key("1")), 2, "Count with a narrower prefix")


@case("keyvalue_scan", requires=REQUIRES)
async def pagination_survives_writes(t: Target) -> None:
    """Keyset pages: inserts and deletes between pages never cause a duplicate or skip a key
    that existed for the whole scan."""
    stable = [t.key(f"k{i:03d}") for i in range(0, 60, 2)]
    doomed = [t.key(f"k{i:03d}") for i in range(1, 60, 10)]
    await put_many(t, stable + doomed)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await scan_page(t, t.prefix, page_size=7, token=token)
        check(len(page.entries) <= 7, f"page of {len(page.entries)} entries with page_size=7")
        seen.extend(e.key for e in page.entries)
        token = page.next_page_token
        if not token:
            break
        pages += 1
        # Between pages: insert before and after the cursor, delete one not-yet-returned key.
        last = seen[-1]
        await put(t, t.key(f"k{pages:03d}a"), b"new")  # sorts early: usually behind the cursor
        await put(t, last + "~", b"new")  # sorts right after the cursor
        ahead = [k for k in doomed if k > last]
        if ahead:
            await remove(t, ahead[0])
        check(pages < 100, "scan did not terminate after 100 pages")
    dupes = sorted({k for k in seen if seen.count(k) > 1})
    equal(dupes, [], "keys returned twice across pages")
    missing = [k for k in stable if k not in seen]
    equal(missing, [], "keys present for the whole scan but never returned")
    equal(seen, utf8_sorted(seen), "keys across pages in ascending order")


@case("keyvalue_scan", requires=REQUIRES)
async def scan_keys_pagination(t: Target) -> None:
    """ScanKeys pages through every key exactly once, in order, honouring page_size."""
    keys = [t.key(f"{i:03d}") for i in range(23)]
    await put_many(t, keys)
    first: pb.ScanKeysResponse = await stub(t).ScanKeys(
        pb.ScanKeysRequest(prefix=t.prefix, page_size=5)
    )
    equal(list(first.keys), keys[:5], "first ScanKeys page of 5")
    check(first.next_page_token, "next_page_token empty although more keys remain")
    equal(await scan_keys_all(t, t.prefix, page_size=5), keys, "all ScanKeys pages")


@case("keyvalue_scan", requires=REQUIRES)
async def page_size_rules(t: Target) -> None:
    """page_size 0 means 100, values above 1000 are coerced to 1000, negative is
    INVALID_ARGUMENT naming page_size."""
    keys = [t.key(f"{i:04d}") for i in range(1001)]
    await put_many(t, keys)
    default = await scan_page(t, t.prefix, page_size=0)
    equal(len(default.entries), 100, "entries with page_size=0 (default 100)")
    check(default.next_page_token, "no next_page_token after a default-sized first page")
    big = await scan_page(t, t.prefix, page_size=5000)
    equal(len(big.entries), 1000, "entries with page_size=5000 (coerced to 1000)")
    rest = await scan_page(t, t.prefix, page_size=5000, token=big.next_page_token)
    equal([e.key for e in rest.entries], keys[1000:], "second page after the coerced one")
    equal(rest.next_page_token, "", "next_page_token after the last page")
    await expect_invalid(
        stub(t).Scan(pb.ScanRequest(prefix=t.prefix, page_size=-1)),
        "page_size",
        "Scan with page_size=-1",
    )
    await expect_invalid(
        stub(t).ScanKeys(pb.ScanKeysRequest(prefix=t.prefix, page_size=-5)),
        "page_size",
        "ScanKeys with page_size=-5",
    )


@case("keyvalue_scan", requires=REQUIRES)
async def bad_page_token(t: Target) -> None:
    """A token that is garbage, or that belongs to a different prefix, is INVALID_ARGUMENT
    naming page_token."""
    await put_many(t, [t.key(f"a{i}") for i in range(3)] + [t.key(f"b{i}") for i in range(3)])
    for token in ("not a token", "%%%", "eyJrIjoxfQ"):
        await expect_invalid(
            stub(t).Scan(pb.ScanRequest(prefix=t.prefix, page_token=token)),
            "page_token",
            f"Scan with page_token {token!r}",
        )
        await expect_invalid(
            stub(t).ScanKeys(pb.ScanKeysRequest(prefix=t.prefix, page_token=token)),
            "page_token",
            f"ScanKeys with page_token {token!r}",
        )
    first = await scan_page(t, t.key("a"), page_size=1)
    check(first.next_page_token, "no next_page_token with more keys left")
    await expect_invalid(
        stub(t).Scan(
            pb.ScanRequest(prefix=t.key("b"), page_size=1, page_token=first.next_page_token)
        ),
        "page_token",
        "Scan reusing a page_token from another prefix",
    )
