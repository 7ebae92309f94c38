"""Every available backend runs the cases of every interface it declares, in-process and as a
sidecar, and answers UNIMPLEMENTED for every catalog interface it does not declare."""

from __future__ import annotations

from collections.abc import Awaitable

import pytest

from prismctl.conformance.core import CaseFailure
from prismctl.conformance.runner import (
    UNIMPLEMENTED,
    cases_for,
    check_unimplemented,
    load_cases,
    run_case,
    undeclared,
)
from tests.conformance.backends import SETUPS
from tests.conformance.conftest import KEY, MODES, NAMESPACE, Deployments, available_backends


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`check` = (backend, mode, case id or undeclared interface) for every available backend."""
    if "check" not in metafunc.fixturenames:
        return
    params = []
    for backend in available_backends():
        for mode in MODES:
            if metafunc.function.__name__ == "test_case":
                checks = [c.id for c in cases_for(backend.implements)]
            else:
                checks = undeclared(backend.implements)
            params += [
                pytest.param((backend.name, mode, c), id=f"{backend.name}-{mode}-{c}")
                for c in checks
            ]
    metafunc.parametrize("check", params)


async def test_case(
    deployments: Deployments, check: tuple[str, str, str], request: pytest.FixtureRequest
) -> None:
    backend, mode, case_id = check
    case = load_cases()[case_id]
    request.node.user_properties.append((KEY, (backend, mode, case.interface)))
    d = await deployments.get(backend, mode)
    failure = await _failure(run_case(case, d.channel, d.declared, d.address, NAMESPACE))
    if failure:
        pytest.fail(f"{case.id}: {failure}", pytrace=False)


async def test_unimplemented(
    deployments: Deployments, check: tuple[str, str, str], request: pytest.FixtureRequest
) -> None:
    backend, mode, interface = check
    request.node.user_properties.append((KEY, (backend, mode, UNIMPLEMENTED)))
    d = await deployments.get(backend, mode)
    failure = await _failure(check_unimplemented(d.channel, interface))
    if failure:
        pytest.fail(failure, pytrace=False)


async def _failure(check: Awaitable[None]) -> str:
    """The CaseFailure message of `check` ("" when it passes), reported without a traceback:
    the message says what broke."""
    try:
        await check
    except CaseFailure as exc:
        return str(exc)
    return ""


def test_every_available_backend_has_a_setup() -> None:
    """A backend marked available must be held to its declaration, not silently skipped."""
    missing = [b.name for b in available_backends() if b.name not in SETUPS]
    assert missing == [], f"available backends without a conformance setup: {missing}"


def test_every_declared_interface_has_cases() -> None:
    """A declared interface without a single case would count as verified while checking
    nothing."""
    untested = sorted(
        {
            f"{b.name}:{i}"
            for b in available_backends()
            for i in b.implements
            if not cases_for([i, *_prerequisites(i)])
        }
    )
    assert untested == [], f"declared interfaces without conformance cases: {untested}"


def _prerequisites(interface: str) -> list[str]:
    """The model's basic interface, which most cases use to set up and read back."""
    return [interface.split("_", 1)[0] + "_basic"]
