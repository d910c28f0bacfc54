"""Build a Layer Card: probe pass(es), statistics, optional coupling and cost calibration."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from layercard.artifacts import Provenance, non_finite
from layercard.card import stats
from layercard.card.artifact import Card, GroupRow, UnitRow, _r, _rl
from layercard.card.probe import (
    UnitAccumulator,
    all_reduce_sums,
    compute_dtype,
    is_sharded,
    make_accumulators,
    rank_world,
    run_probe,
    shard,
    shared_cores,
)
from layercard.config import CardConfig
from layercard.errors import LayercardError, setting_name
from layercard.inference import as_float64
from layercard.progress import count, say, say_progress, track


def _np_dtype(dtype: torch.dtype) -> type:
    return np.float32 if dtype == torch.float32 else np.float64


def _finish_pass(
    accs: Sequence[UnitAccumulator],
    cfg: CardConfig,
    n_target_tokens: int,
    weight_snrs: Mapping[str, float | None] | None = None,
    *,
    keep_grads: bool | None = None,
    workers: int | None = None,
) -> tuple[list[UnitRow], list[GroupRow], dict[str, torch.Tensor], dict[str, stats.Spectrum]]:
    """The card's rows from one pass's sums; each unit's float64 ∇W is returned only with ``keep_grads``
    (default: when the coupling probe will read them).

    The statistics run in the sums' own precision (docs/card.md, "Precision"). The inputs' and then the
    units' decompositions run side by side on ``workers`` threads (default: as many as torch uses), each
    with one BLAS thread: at these sizes LAPACK makes poor use of a second thread within one decomposition
    (docs/card.md, "Statistics threads"). With one worker BLAS keeps its own threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    keep_grads = cfg.coupling if keep_grads is None else keep_grads
    weight_snrs = weight_snrs or {}
    scale = cfg.lora_alpha / cfg.lora_rank
    inputs = list({id(a.group): a for a in accs}.values())  # the first unit of each input, in pass order
    for acc in inputs:
        if acc.group.n == 0:
            raise LayercardError("probe set has no unpadded positions")
    # Overflowed sums (weights far too large for the dtype) have no spectrum: the decomposition would fail
    # on them, or worse converge to a meaningless one. Checked here, naming the first unit, before any.
    sums = [("input", acc, acc.group.xtx) for acc in inputs] + [("gradient", acc, acc.grad) for acc in accs]
    for what, acc, t in sums:  # each input's sum once, though its units share it
        if not bool(torch.isfinite(t).all()):
            raise LayercardError(
                f"unit {acc.spec.key}: its {what} sums are not finite (NaN or infinite): the probe "
                f"pass overflowed {str(t.dtype).removeprefix('torch.')}; are the model's weights far too "
                "large for its dtype?"
            )

    def of_input(acc: UnitAccumulator) -> tuple[stats.Spectrum, Any, np.ndarray | None]:
        g = acc.group
        # The sum's upper triangle is whole, and it is all the decomposition reads.
        spec = stats.spectrum(g.xtx.cpu().numpy(), g.n, vectors_dtype=_np_dtype(g.xtx.dtype))
        return (
            spec,
            stats.input_stats(spec.eigenvalues, cfg.delta),
            (None if g.sketch is None else g.sketch.cpu().numpy()),
        )

    workers = max(1, torch.get_num_threads()) if workers is None else workers
    one_each = threadpool_limits(limits=1, user_api="blas") if workers > 1 else contextlib.nullcontext()
    with one_each, ThreadPoolExecutor(workers) as pool:
        by_input = dict(zip((id(a.group) for a in inputs), pool.map(of_input, inputs), strict=True))

        def of_unit(acc: UnitAccumulator) -> dict[str, Any]:
            g = acc.group
            spec, _, sketch = by_input[id(g)]
            grad = acc.grad.cpu().numpy()
            gcoord = grad @ sketch if sketch is not None else grad
            proj = stats.eig_projection(gcoord, spec)
            energy_j = stats.grad_eig_energy(gcoord, spec, proj)
            rsq = stats.resnorm_sq_from_energy(energy_j, spec.eigenvalues, spec.n, cfg.delta)
            m = stats.whitened_gradient(gcoord, spec, cfg.delta, proj)
            r = cfg.lora_rank
            a = as_float64(acc.a_stack).cpu().numpy()
            asa = as_float64(acc.asa).cpu().numpy() / g.n
            draws = [a[i * r : (i + 1) * r] for i in range(cfg.a_draws)]
            asas = [asa[i * r : (i + 1) * r, i * r : (i + 1) * r] for i in range(cfg.a_draws)]
            rate, lin, quad = stats.first_step_rate(
                grad, draws, asas, lr=cfg.lr, scale=scale, curvature=g.n / n_target_tokens
            )
            return {
                "grad_norm": float(np.linalg.norm(grad)),
                "rsq": rsq,
                "captured": stats.captured(stats.singular_values_sq(m)),
                "rate": (rate, lin, quad),
                "energy": energy_j,
            }

        per_unit = list(pool.map(of_unit, accs))

    group_rows: list[GroupRow] = []
    unit_rows: list[UnitRow] = []
    grads: dict[str, torch.Tensor] = {}
    spectra: dict[str, stats.Spectrum] = {}
    keys: dict[int, str] = {}
    for acc, u in zip(accs, per_unit, strict=True):
        g = acc.group
        if id(g) not in keys:
            spec, st, _ = by_input[id(g)]
            gkey = keys[id(g)] = f"{acc.spec.layer}.{acc.spec.input_group}"
            group_rows.append(
                GroupRow(
                    key=gkey,
                    layer=acc.spec.layer,
                    input_group=acc.spec.input_group,
                    d_in=g.d_in,
                    n=g.n,
                    sketched=None if g.sketch is None else int(g.sketch.shape[1]),
                    eigenvalues=_rl(spec.eigenvalues),
                    # A Gaussian sketch keeps tr(Σ) unbiased, so energy stays per original input dimension.
                    energy=_r(spec.trace / g.d_in),
                    kappa=_r(st.kappa),
                    effective_rank=_r(st.effective_rank),
                    noise_amplification=_r(st.noise_amplification),
                )
            )
            spectra[gkey] = spec
        if keep_grads:
            grads[acc.spec.key] = as_float64(acc.grad).cpu()
        rate, lin, quad = u["rate"]
        unit_rows.append(
            UnitRow(
                key=acc.spec.key,
                layer=acc.spec.layer,
                role=acc.spec.role,
                name=acc.spec.name,
                d_in=acc.spec.d_in,
                d_out=acc.spec.d_out,
                group=keys[id(g)],
                grad_norm=_r(u["grad_norm"]),
                resnorm=_r(math.sqrt(max(u["rsq"], 0.0))),
                captured={str(k): _r(v) for k, v in u["captured"].items()},
                rate=_r(rate),
                rate_linear=_r(lin),
                rate_quadratic=_r(quad),
                lora_params=cfg.lora_rank * (acc.spec.d_in + acc.spec.d_out),
                grad_eig_energy=_rl(u["energy"]),
                weight_snr=weight_snrs.get(acc.spec.key),
                module_kind=acc.spec.module_kind,
            )
        )
    return unit_rows, group_rows, grads, spectra


def _weight_snrs(model: Any, specs: Sequence[Any], rank: int) -> dict[str, float | None]:
    """Each unit's weight SNR (docs/design.md §3) from its singular values (CPU); None on other processes.

    Sharded weights are gathered whole on every process (a collective each must join, in the same order);
    only the first process, whose card is the one written, then pays for the SVDs.
    """
    from layercard.models import linear_weight

    out: dict[str, float | None] = {}
    for spec in specs:
        w = linear_weight(model, spec.name).detach()
        if hasattr(w, "full_tensor"):  # a DTensor: this process holds only its shard
            w = w.full_tensor()
        if rank != 0:
            out[spec.key] = None
            continue
        w = w.to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(w).all()):
            raise LayercardError(f"unit {spec.key} ({spec.name}): the weight holds NaN or Infinity")
        # From the smaller Gram matrix in float64: the same values as an SVD to ~1e-6 of the largest, in
        # about half the time on the wide MLP matrices.
        sv = np.sqrt(stats.singular_values_sq(w.double().numpy()))
        out[spec.key] = _r(stats.weight_snr(sv, (int(w.shape[0]), int(w.shape[1]))))
    return out


def _layer_chunks(layers: Sequence[int], n_groups: int) -> list[list[int]]:
    layers = sorted(set(layers))
    n_groups = min(n_groups, len(layers))
    return [list(c) for c in np.array_split(np.asarray(layers), n_groups)]


def compute_card(loaded: Any, task: Any, cfg: CardConfig, *, progress: bool | None = None) -> Card:
    """Measure the frozen model on the task and return the Layer Card (docs/design.md §3–§5).

    Inside a process group every process must call it: each takes its share of the probe batches and the
    sums are added over the group (§12). The first process alone then runs coupling and calibration and
    measures the weights' SNR, so only its card is complete; the others return theirs without coupling,
    cost and weight_snr. The global random generators are seeded with ``cfg.seed`` for the card's own
    draws (the calibration's LoRA initialisations) and left as the caller had them.
    """
    with _seeded_rng(cfg.seed, loaded.model):
        return _compute_card(loaded, task, cfg, progress=progress)


def _devices(model: Any) -> dict[str, set[int]]:
    """The accelerators the model's parameters sit on, by kind."""
    used: dict[str, set[int]] = {}
    for p in model.parameters():
        kind = p.device.type
        if kind in ("cpu", "meta"):
            continue
        module = torch.get_device_module(kind)
        index = p.device.index
        if index is None:
            index = module.current_device() if hasattr(module, "current_device") else 0
        used.setdefault(kind, set()).add(index)
    return used


def _seed(seed: int, model: Any) -> None:
    """Seed the CPU generator and that of each accelerator the model sits on (no other device's)."""
    torch.random.default_generator.manual_seed(seed)
    for kind, indices in _devices(model).items():
        module = torch.get_device_module(kind)
        for index in sorted(indices):
            # manual_seed seeds the current device of its kind: make each one current in turn.
            with module.device(index) if hasattr(module, "device") else contextlib.nullcontext():
                module.manual_seed(seed)


@contextlib.contextmanager
def _seeded_rng(seed: int, model: Any) -> Iterator[None]:
    """The CPU generator, and that of each accelerator the model sits on, seeded for the block; the
    caller's states restored after it (other devices are left alone, untouched)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator alone
        for kind, indices in _devices(model).items():
            stack.enter_context(torch.random.fork_rng(devices=sorted(indices), device_type=kind))
        _seed(seed, model)
        yield


_RATE_FIELDS = ("rate", "rate_linear", "rate_quadratic")


def _check_finite(
    cfg: CardConfig, units: Sequence[UnitRow], groups: Sequence[GroupRow], rest: Mapping[str, Any]
) -> None:
    """Refuse NaN or infinity in what the card would hold, naming the statistic and its unit or input:
    JSON has no such numbers, and every score read from them would be meaningless."""
    from layercard.artifacts import show

    for kind, rows in (("unit", units), ("input", groups)):
        for row in rows:
            found = non_finite(dataclasses.asdict(row))
            if found is None:
                continue
            field, value = found
            hint = ""
            if field in _RATE_FIELDS:
                hint = (
                    f" at lr {cfg.lr:g}, lora_alpha {cfg.lora_alpha:g}, lora_rank {cfg.lora_rank} "
                    f"(lower {setting_name('lr')} or {setting_name('lora_alpha')})"
                )
            name = f" ({row.name})" if isinstance(row, UnitRow) else ""
            raise LayercardError(f"{kind} {row.key}{name}: its {field} is not finite ({show(value)}){hint}")
    found = non_finite(dict(rest))
    if found is not None:
        raise LayercardError(f"card: {found[0]} is not finite ({show(found[1])})")


# One function on purpose: the probe passes, statistics, coupling and calibration run and are timed in
# this order, and each phase's wall time lands in card.timings; split, the order would be harder to read.
def _compute_card(loaded: Any, task: Any, cfg: CardConfig, *, progress: bool | None = None) -> Card:
    from layercard import models
    from layercard.errors import setting_name, setting_text
    from layercard.tasks import batches as make_batches
    from layercard.tasks import count_target_tokens, cut_note, encode_task, target_entropy

    t0 = time.perf_counter()
    rank, world = rank_world()
    config = dataclasses.asdict(cfg)  # what was asked, also on the processes that skip coupling and cost
    if is_sharded(loaded.model) and (cfg.coupling or cfg.calibrate):
        raise LayercardError(
            f"the model's weights are sharded over {world} processes (FSDP); coupling and calibrate run on "
            "the first process alone and need the whole model: set coupling=False, calibrate=False"
        )
    if rank != 0:
        # Both read the whole card, which the first process holds once the sums are added; once is enough,
        # and calibration must time steps in one process, as a training process runs them.
        cfg = dataclasses.replace(cfg, coupling=False, calibrate=False)
        progress = False
    model, tok = loaded.model, loaded.tokenizer
    # The spec as written: a role set ('all-linear', 'mlp') takes what the model has; a role named one by
    # one must exist. The card records the roles its units cover.
    specs = models.units(model, cfg.roles)
    narrowest = min(specs, key=lambda u: min(u.d_in, u.d_out), default=None)
    if narrowest is not None and cfg.lora_rank > min(narrowest.d_in, narrowest.d_out):
        # a rank past a module's width adds no capacity, and its draws of A alone may not fit in memory
        raise LayercardError(
            f"{setting_name('lora_rank')} {cfg.lora_rank}: above the width of unit {narrowest.key} "
            f"({narrowest.d_in}→{narrowest.d_out}); a LoRA of rank r > min(d_in, d_out) adds nothing"
        )
    unmapped = models.layout_for(model).unmapped
    if unmapped:
        shown = ", ".join(unmapped[:3]) + (", ..." if len(unmapped) > 3 else "")
        say(
            f"note: layers found by name (no known layout for this model): {len(unmapped)} linear modules "
            f"of its decoder layers have no role and are never adapted ({shown})",
            enabled=progress,
        )
    covered = {r for s in specs for r in s.covers}
    roles = tuple(r for r in models.parse_roles(cfg.roles) if r in covered)
    probe_task = task.subset(cfg.examples, seed=cfg.seed)
    if len(probe_task.examples) == 0:
        raise LayercardError(f"task {task.name}: no examples to probe")
    # Examples are cut to the model's context as to --max-length: past a learned position table a forward
    # fails, and past any other the model reads positions it never saw.
    context = models.context_length(model)
    length = cfg.max_length if context is None else min(cfg.max_length, context[1])
    encoded = encode_task(tok, probe_task, max_length=length)
    n_cut = sum(e.cut for e in encoded)
    capped = length < cfg.max_length
    notes: list[str] = []
    # `layercard card` shares --max-length's name with other commands: its own is said to be the card's
    asked = setting_name("max_length", flag="the card's --max-length")
    if capped and n_cut and context is not None:
        notes.append(
            f"note: the model reads at most {context[1]} positions ({context[0]} in its config), so "
            f"{asked} {cfg.max_length} acts as {length}: {n_cut} of {len(encoded)} probe "
            "examples are longer and were cut to it (the prompt first)"
        )
    cut = cut_note(encoded, None if capped else length, "probe", probe_task.format, setting=asked)
    if cut:
        notes.append(cut)
    n_tgt = count_target_tokens(encoded)
    if n_tgt == 0:
        raise LayercardError(f"task {task.name}: the probe set has no target tokens")
    # From the whole task, not the probe set: a few dozen examples would hold too few target tokens.
    t_h = time.perf_counter()
    h_nats, h_tokens = target_entropy(tok, task, length, seed=cfg.seed)
    target_entropy_s = time.perf_counter() - t_h
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch_list = list(make_batches(encoded, cfg.batch_size, pad_id))
    if world > 1 and len(batch_list) % world and is_sharded(loaded.model):
        # every forward and backward of a sharded model gathers its weights from all processes: one with a
        # micro-batch fewer would leave the others waiting in that gather for good
        k = len(batch_list) // world * world
        if k:
            fix = setting_text("examples", k * cfg.batch_size)
        else:  # fewer micro-batches than processes: one of a smaller batch each
            per = max(1, len(encoded) // world)
            fix = f"{setting_text('examples', per * world)} with {setting_text('batch_size', per)}"
        raise LayercardError(
            f"the model's weights are sharded over {world} processes (FSDP): the probe's "
            f"{len(batch_list)} micro-batches of {cfg.batch_size} must divide among them; set "
            f"{setting_name('examples')} or {setting_name('batch_size')} so they do (e.g. {fix})"
        )
    # Every process forms the same batches from the whole probe set, then takes its share of them.
    local_batches = shard(batch_list, rank, world)
    device = next(model.parameters()).device
    resident = None
    if cfg.calibrate:  # before the probe holds anything: what a training process starts from
        from layercard.cost import memory_in_use, touch_weights

        touch_weights(model)
        resident = memory_in_use(device)

    timings: dict[str, float] = {"target_entropy_s": target_entropy_s}
    t_snr = time.perf_counter()
    weight_snrs = _weight_snrs(model, specs, rank) if cfg.weight_snr else {}
    timings["weight_snr_s"] = time.perf_counter() - t_snr

    _seed(cfg.seed, model)  # here, as cards before the seeding moved were made: the same draws
    unit_rows: list[UnitRow] = []
    group_rows: list[GroupRow] = []
    grads: dict[str, torch.Tensor] = {}
    spectra: dict[str, stats.Spectrum] = {}
    loss = float("nan")
    chunks = _layer_chunks([s.layer for s in specs], cfg.layer_groups)
    sketch = cfg.sketch_size(models.hidden_size(model))
    t_probe = time.perf_counter()
    # Processes side by side on one machine's cores each take their share of the threads; the first gets
    # all of them back for coupling and calibration, which it runs alone.
    with shared_cores(world, device):
        for ci, chunk in enumerate(chunks):
            cspecs = [s for s in specs if s.layer in set(chunk)]
            accs = make_accumulators(
                cspecs,
                lora_rank=cfg.lora_rank,
                a_draws=cfg.a_draws,
                seed=cfg.seed,
                sketch=sketch,
                device=device,
                dtype=compute_dtype(next(model.parameters()).dtype),
            )
            desc = "card pass" if len(chunks) == 1 else f"card pass {ci + 1}/{len(chunks)}"
            loss = run_probe(
                model,
                local_batches,
                accs,
                n_target_tokens=n_tgt,  # the whole probe set's count: the shares' losses add up to its mean
                progress=lambda it, d=desc: track(it, d, total=len(local_batches), enabled=progress),
                start_layer=min(chunk),
                numbering=(rank, world),  # shard's deal
            )
            if world > 1:
                loss = all_reduce_sums(accs, loss)
            t_stats = time.perf_counter()
            # the statistics take as long as the pass or longer, with no bar of their own
            say_progress(f"{desc}: statistics of {count(len(accs), 'unit')}", enabled=progress)
            u, g, gr, sp = _finish_pass(accs, cfg, n_tgt, weight_snrs)
            timings["stats_s"] = timings.get("stats_s", 0.0) + time.perf_counter() - t_stats
            _check_finite(cfg, u, g, {})  # before coupling and calibration spend their time
            unit_rows += u
            group_rows += g
            if cfg.coupling:  # only the coupling probe needs them; kept, they would defeat layer groups
                grads.update(gr)
                spectra.update(sp)
            del accs, gr, sp
    timings["probe_s"] = time.perf_counter() - t_probe
    n_positions = group_rows[0].n if group_rows else 0

    coupling = None
    if cfg.coupling:
        t_c = time.perf_counter()
        coupling = _coupling(model, specs, grads, spectra, unit_rows, cfg, encoded, pad_id, progress)
        timings["coupling_s"] = time.perf_counter() - t_c

    cost = None
    if cfg.calibrate:
        from layercard.cost import calibrate

        t_k = time.perf_counter()
        cost = calibrate(
            model,
            tok,
            batch_list[0],
            roles,
            steps=cfg.calibrate_steps,
            rounds=cfg.calibrate_rounds,
            progress=progress,
            resident_mib=resident,
            dropout=cfg.calibrate_dropout,
            checkpointing=cfg.calibrate_checkpointing,
        ).to_dict()
        timings["calibrate_s"] = time.perf_counter() - t_k

    _check_finite(cfg, [], [], {"loss": loss, "coupling": coupling, "cost": cost})
    # Said whether or not progress is shown (--json, LAYERCARD_PROGRESS=0): the card measured other
    # sequences than the task's, which no progress switch should hide. Said once the card is whole, so
    # that a failing card prints its error alone. The card records the counts too.
    for text in notes:
        say(text, enabled=rank == 0)
    timings["total_s"] = time.perf_counter() - t0
    layout = models.layout_for(model)
    prov = Provenance.make(
        stage="card",
        model_id=loaded.model_id,
        model_hash=loaded.model_hash,
        tokenizer_hash=loaded.tokenizer_hash,
        task=task.name,
        data_hash=probe_task.data_hash,
        config={**config, **models.running_on(model)},  # the card itself keeps its settings alone
        seed=cfg.seed,
        wall_time_s=timings["total_s"],
    )
    return Card(
        provenance=prov.to_dict(),
        config=config,
        model={
            "id": loaded.model_id,
            "hash": loaded.model_hash,
            "family": layout.family,
            "n_layers": models.num_layers(model),
            "d_model": models.hidden_size(model),
        },
        task={
            "name": task.name,
            "source": task.source,
            "split": task.split,
            "n_examples": len(probe_task.examples),
            "data_hash": probe_task.data_hash,
            "prompt": probe_task.describe()["prompt"],
            "target_entropy": round(h_nats, 4),
            "target_entropy_tokens": h_tokens,
            "max_length": length,  # the --max-length asked for, or the model's context where shorter
            "examples_cut": n_cut,  # longer than max_length, cut to it
            "examples_clipped": sum(e.clipped for e in encoded),  # cut to the task format's own limits
        },
        roles=list(roles),
        n_positions=n_positions,
        n_target_tokens=n_tgt,
        loss=_r(loss),
        units=unit_rows,
        groups=group_rows,
        coupling=coupling,
        cost=cost,
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def unit_direction(
    grad: torch.Tensor, spec: stats.Spectrum | None, cfg: CardConfig, kind: str, key: str
) -> torch.Tensor:
    """The update direction a unit contributes to its layer's coupling probe."""
    g = grad.double()
    if kind == "capacity":
        if spec is None:
            raise LayercardError("capacity direction needs an exact (unsketched) covariance")
        lam = stats.damping(spec.eigenvalues, cfg.delta)
        u = torch.from_numpy(spec.eigenvectors).double()
        inv = torch.from_numpy(1.0 / (spec.eigenvalues + lam))
        return -((g @ u) * inv[None, :]) @ u.T
    from layercard.card.probe import _stable_seed

    rng = np.random.default_rng(_stable_seed(cfg.seed, f"lora_a.{key}"))
    d_in = g.shape[1]
    bound = 1.0 / math.sqrt(d_in)
    a = torch.from_numpy(rng.uniform(-bound, bound, size=(cfg.lora_rank, d_in)))
    s = torch.sign(g @ a.T)
    return -cfg.lr * (cfg.lora_alpha / cfg.lora_rank) * s @ a


def _coupling(model, specs, grads, spectra, unit_rows, cfg, encoded, pad_id, progress) -> dict[str, Any]:
    from layercard.card.coupling import layer_effects
    from layercard.tasks import batches as make_batches

    by_key = {u.key: u for u in unit_rows}
    directions: dict[int, dict[str, torch.Tensor]] = {}
    for s in specs:
        row = by_key[s.key]
        sp = spectra.get(row.group)
        d = unit_direction(grads[s.key], sp, cfg, cfg.coupling_direction, s.key)
        dev = next(model.parameters()).device
        dt = next(model.parameters()).dtype
        directions.setdefault(s.layer, {})[s.name] = d.to(device=dev, dtype=dt)
    sub = encoded[: cfg.coupling_examples]
    cb = list(make_batches(sub, cfg.batch_size, pad_id))
    layers, effects = layer_effects(
        model,
        directions,
        cb,
        progress=lambda it: track(it, "coupling", total=len(directions), enabled=progress),
    )
    c = stats.coupling_matrix(effects)
    return {
        "level": "layer",
        "direction": cfg.coupling_direction,
        "examples": len(sub),
        "layers": layers,
        "matrix": [[_r(v) for v in row] for row in c],
        "effect_norms": _rl(np.linalg.norm(effects, axis=1)),
    }
