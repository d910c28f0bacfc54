"""Role names: the canonical linear roles of a decoder layer, fused roles, and role-set specs.

A role is what a linear module computes (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``). A fused
module (``qkv``, ``gate_up``) computes several canonical roles at once (docs/design.md §2).
"""

from __future__ import annotations

from collections.abc import Sequence

from layercard.errors import LayercardError

CANONICAL_ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
FUSED_ROLES: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
ROLE_SETS: dict[str, tuple[str, ...]] = {
    "attention": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "all-linear": CANONICAL_ROLES,
}
# Roles that read the same input tensor share a group.
INPUT_GROUPS: dict[str, str] = {
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "qkv": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "gate_up": "mlp_in",
    "down": "mlp_mid",
}

# What a layout stores per role: (path inside a decoder layer, canonical roles covered, input group).
RoleSpec = tuple[str, tuple[str, ...], str]


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [str(s).strip().lower() for s in items if str(s).strip()]


def parse_roles(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``'q,v'`` | ``'attention'`` | ``'mlp'`` | ``'all-linear'`` | list -> canonical roles, canonical order.

    Fused names (``qkv``, ``gate_up``) expand to the roles they cover.
    """
    items = _split_spec(spec)
    if not items:
        raise LayercardError(f"roles {spec!r}: empty; use e.g. 'q,v', 'attention', 'mlp' or 'all-linear'")
    wanted: set[str] = set()
    for item in items:
        if item in ROLE_SETS:
            wanted.update(ROLE_SETS[item])
        elif item in FUSED_ROLES:
            wanted.update(FUSED_ROLES[item])
        elif item in CANONICAL_ROLES:
            wanted.add(item)
        else:
            valid = ", ".join([*CANONICAL_ROLES, *FUSED_ROLES, *ROLE_SETS])
            raise LayercardError(f"roles: unknown role {item!r}; valid: {valid}")
    return tuple(r for r in CANONICAL_ROLES if r in wanted)


def explicit_roles(spec: str | Sequence[str]) -> set[str]:
    """Roles the user named one by one (not through a set such as 'mlp'); these must exist in the model."""
    out: set[str] = set()
    for item in _split_spec(spec):
        if item in FUSED_ROLES:
            out.update(FUSED_ROLES[item])
        elif item in CANONICAL_ROLES:
            out.add(item)
    return out


def role_spec(path: str, role: str) -> RoleSpec:
    """The layout entry for a module at ``path`` (inside a decoder layer) computing ``role``."""
    return (path, FUSED_ROLES.get(role, (role,)), INPUT_GROUPS[role])


def role_order(role: str) -> int:
    """Sort key: a role's position in canonical order (a fused role sorts as its first covered role)."""
    return CANONICAL_ROLES.index(FUSED_ROLES.get(role, (role,))[0])
