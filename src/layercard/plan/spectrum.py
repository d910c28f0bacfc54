"""Policy ``spectrum``: the layers whose frozen weights carry the most signal, per role (docs/design.md §6).

Each role (module type) ranks its layers by the card's ``weight_snr`` (the Marchenko–Pastur signal-to-noise
ratio of the frozen weight, §3), highest first, and every role keeps the same top share of its layers, all at
one rank. The share is fitted to the budgets the way ``last-n`` fits its n: the largest share whose
placement, priced exactly as the search prices its grid, meets every budget.
"""

from __future__ import annotations

from collections.abc import Sequence

from layercard.card.artifact import Card, UnitRow
from layercard.config import Budget
from layercard.errors import LayercardError
from layercard.plan.frontier import MATRICES, Candidate, Search


def snr_ranking(card: Card) -> dict[str, list[UnitRow]]:
    """Per role (in card order), its units by ``weight_snr``, highest first (ties: the lower layer)."""
    missing = [u.key for u in card.units if u.weight_snr is None]
    if missing:
        raise LayercardError(
            f"policy spectrum: the card has no weight_snr for {len(missing)} of its {len(card.units)} units "
            f"(e.g. {missing[0]}: a card measured with weight_snr off, or before weight SNRs were recorded); "
            "re-measure the card with `layercard card --weight-snr` (card.weight_snr: true in a run config)"
        )
    by_role: dict[str, list[UnitRow]] = {}
    for u in card.units:
        by_role.setdefault(u.role, []).append(u)
    return {
        role: sorted(units, key=lambda u: (-float(u.weight_snr or 0.0), u.layer))
        for role, units in by_role.items()
    }


def spectrum_units(ranking: dict[str, list[UnitRow]], n: int, n_layers: int) -> list[UnitRow]:
    """The top ``n`` of ``n_layers`` layers' share of every role (at least one unit each), by layer then role.

    A role present in fewer layers (a generic layout's) keeps the same share of the layers it has.
    """
    chosen: list[UnitRow] = []
    for units in ranking.values():
        k = max(1, min(len(units), int(n * len(units) / n_layers + 0.5)))
        chosen += units[:k]
    role_index = {role: i for i, role in enumerate(ranking)}
    return sorted(chosen, key=lambda u: (u.layer, role_index[u.role]))


def _matrices(roles: Sequence[str]) -> str:
    """The search's name of a role set (``all-linear``), else the roles themselves."""
    return next((name for name, rs in MATRICES.items() if set(rs) == set(roles)), ",".join(roles))


def spectrum_family(search: Search, rank: int) -> list[Candidate]:
    """Spectrum placements at ``rank`` from every layer down to one per role, in the order users step down."""
    if search.price is None:
        raise LayercardError("policy spectrum: this search cannot price placements outside its grid")
    ranking = snr_ranking(search.card)
    matrices = _matrices(list(ranking))
    n_layers = search.card.n_layers
    out: list[Candidate] = []
    seen: set[tuple[str, ...]] = set()
    for n in range(n_layers, 0, -1):
        units = spectrum_units(ranking, n, n_layers)
        keys = tuple(u.key for u in units)
        if keys in seen:  # roles on few layers round two shares to the same placement
            continue
        seen.add(keys)
        layers = sorted({u.layer for u in units})
        rule = "all" if n == n_layers else f"snr-top-{n}"
        out.append(search.price(matrices, rule, layers, units, rank))
    return out


def fit_spectrum(search: Search, budgets: Sequence[Budget], rank: int) -> Candidate:
    """The largest share of high-SNR layers whose placement meets every budget."""
    for c in spectrum_family(search, rank):
        if search.fits(c, budgets):
            return c
    raise LayercardError(f"policy spectrum: nothing it can place fits {', '.join(b.label for b in budgets)}")
