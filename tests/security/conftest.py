from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.security.certs import CA, Issued


@dataclass(frozen=True)
class PKI:
    ca: CA
    #: a CA the servers do not trust
    other_ca: CA
    server: Issued
    client: Issued
    #: a client certificate signed by other_ca
    stranger: Issued


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    ca = CA(root / "ca", "prism-test-ca")
    other = CA(root / "other", "other-ca")
    return PKI(
        ca=ca,
        other_ca=other,
        server=ca.issue("prism-server", server=True),
        client=ca.issue("client-a", server=False),
        stranger=other.issue("stranger", server=False),
    )
