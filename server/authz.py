"""Who the caller is for authorization (docs/authorization.md): a Principal derived from the
API key (server/auth.py) and the namespace's grant, kept in `current_principal` for the call.

Services ask the principal, never the raw key: `level_in(org)` is the caller's effective level
in an organization, `sees_everything` marks the system (auth off) and server admins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

from plugins.runtime import errors


class Level(IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ROLE_LEVELS = {"viewer": Level.READ, "editor": Level.WRITE, "admin": Level.ADMIN}
LEVEL_NAMES = {level.label: level for level in Level if level}
#: thin-interface RPCs that reshape a namespace or act on much of its data: admin level;
#: every other RPC needs read when it only reads (server.auth.is_mutation), else write
ADMIN_RPCS = frozenset(
    {
        "CreateIndex",
        "DropIndex",
        "ConfigureDeadLetter",
        "RedriveDeadLetters",
        "SetRetention",
        "Trim",
        "ReencryptAll",
    }
)


@dataclass(frozen=True, slots=True)
class NamespaceAccess:
    """A namespace's `access:` map: the highest level each organization gets there (NONE: the
    namespace does not exist for it)."""

    #: the namespace
    name: str
    grants: Mapping[str, Level]
    #: the "*" grant (NONE without one) for every organization not named, and for keys of none
    others: Level

    @classmethod
    def of(cls, name: str, access: Mapping[str, str] | None) -> NamespaceAccess:
        """From the config's map of level names; no map: every organization gets admin, i.e.
        its keys' own level."""
        if access is None:
            return cls(name, {}, Level.ADMIN)
        grants = {organization: LEVEL_NAMES[level] for organization, level in access.items()}
        return cls(name, grants, grants.pop("*", Level.NONE))

    def grant(self, organization: str) -> Level:
        return self.grants.get(organization, self.others)


@dataclass(frozen=True)
class Principal:
    """The caller of one call, as authorization sees it."""

    #: "" for a key of no organization (and the system)
    organization: str
    #: the key's owner ("" when it has none)
    owner: str
    #: effective level in its own organization (key's role capped by the namespace grant)
    level: Level
    #: the system (auth off) or a server admin: admin everywhere
    sees_everything: bool = False
    #: who this is in user-facing records (stars): the owner, else `key:<id>`
    user: str = ""

    def member_of(self, organization: str) -> bool:
        if self.sees_everything:
            return True
        return bool(self.organization) and organization == self.organization

    def level_in(self, organization: str) -> Level:
        if self.sees_everything:
            return Level.ADMIN
        return self.level if self.member_of(organization) else Level.NONE

    def owns(self, organization: str, owner: str) -> bool:
        return bool(self.owner) and owner == self.owner and self.member_of(organization)

    def require(self, organization: str, needed: Level, what: str) -> None:
        """PERMISSION_DENIED unless the caller has `needed` in `organization`."""
        have = self.level_in(organization)
        if have >= needed:
            return
        if not self.member_of(organization):
            raise errors.PermissionDenied(
                f"{what} needs {needed.label} access in organization '{organization}', "
                "and this API key is not a member of it",
                reason="NOT_ORGANIZATION_MEMBER",
                organization=organization,
                required=needed.label,
            )
        raise errors.PermissionDenied(
            f"{what} needs {needed.label} access in organization '{organization}'; "
            f"this API key has {have.label}",
            reason="ROLE_REQUIRED",
            organization=organization,
            required=needed.label,
            level=have.label,
        )


#: the principal of an unauthenticated server (`--no-auth`): everything is allowed
SYSTEM = Principal("", "", Level.ADMIN, sees_everything=True, user="system")

#: the caller of the call being handled (SYSTEM when nothing authenticated it: auth is off)
current_principal: ContextVar[Principal] = ContextVar("prism_principal", default=SYSTEM)


def principal_for(
    key_id: str, organization: str, owner: str, roles: tuple[str, ...], grant: Level
) -> Principal:
    """The principal of an API key in a namespace granting its organization `grant`."""
    level = max((ROLE_LEVELS.get(r, Level.NONE) for r in roles), default=Level.NONE)
    user = owner or f"key:{key_id}"
    if level == Level.ADMIN and not organization and grant == Level.ADMIN:
        return Principal("", owner, Level.ADMIN, sees_everything=True, user=user)
    # a server admin key its scopes hold below admin is a member of nothing, like any key
    # without an organization
    return Principal(organization, owner, min(level, grant), user=user)


#: the name a key's scopes give the key administration API (KeyAdminService)
ADMIN_API_SCOPE = "prism-admin"
#: a scope: a namespace (or ADMIN_API_SCOPE), optionally capped at a level
SCOPE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,62})(?::(?P<level>read|write|admin))?")


@lru_cache(maxsize=4096)
def scope_level(scopes: tuple[str, ...], namespace: str) -> Level:
    """The most a key's scopes allow in `namespace` (or the key API): a key without scopes
    is unrestricted, one with scopes reaches only what they name."""
    if not scopes:
        return Level.ADMIN
    best = Level.NONE
    for scope in scopes:
        name, _, level = scope.partition(":")
        if name == namespace:
            best = max(best, LEVEL_NAMES.get(level, Level.ADMIN))
    return best
