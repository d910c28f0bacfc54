"""placement.md: the report's tables, with a plain statement wherever `card` does not win."""

from __future__ import annotations

from typing import Any

from .jobs import variants
from .settings import POLICY_ORDER, Settings
from .text import fmt, layers_text, md_table, mean_or_none

Lines = list[str]


def markdown(out: dict[str, Any], bench: Any) -> str:
    """The results as markdown tables, with a plain statement wherever `card` does not win."""
    s, tasks = bench.s, bench.task_names
    lines = _header(out, s) + _settings(out, s) + _protocol(s)
    lines += _predicts(out, s, tasks) + _budgets(out, tasks) + _seeds(out, s, tasks)
    lines += _closing_numbers(out, tasks) + _trims(out) + _changes(out) + _reproduce(s)
    return "\n".join(lines) + "\n"


def _header(out: dict[str, Any], s: Settings) -> Lines:
    st = out["status"]
    L: Lines = [f"# Placement benchmark — {s.model}", ""]
    total = st["done"] + st["missing"]
    if st["missing"]:
        L += [
            f"**Partial results: {st['done']} of {total} placements measured, {st['missing']} missing.** "
            "Missing runs show as –; rankings below cover only what was measured.",
            "",
        ]
    if s.dry_run:
        L += [
            "**Dry run (`--dry-run-tiny`): a tiny random model on synthetic data, 2 steps. The numbers "
            "exercise the control flow and mean nothing.**",
            "",
        ]
    L += [f"Generated {out['created']}; measured on:", ""]
    for e in out.get("measured_on") or [{"machine": out["machine"], "versions": out["versions"]}]:
        m = e["machine"]
        L += [
            "- "
            + (f"{m['cuda_device']} · " if m.get("cuda_device") else "")
            + f"{m.get('processor')} · {m.get('cpu_count')} cores · torch threads {m.get('torch_threads')} · "
            + ", ".join(f"{k} {v}" for k, v in e["versions"].items())
        ]
    return L + [""]


def _settings(out: dict[str, Any], s: Settings) -> Lines:
    L: Lines = ["## Settings and why", ""]
    head = ["task", "train on", "evaluate on", "batch", "max tokens", "prompt cap", "loss ex.", "metric ex."]
    body = [
        [
            t.name,
            f"{t.train_spec}:{t.train_split}",
            f"{t.test_spec}:{t.test_split}",
            t.batch_size,
            t.max_length,
            t.max_input_tokens or "preset",
            t.loss_examples,
            t.gen_examples,
            t.max_new_tokens,
            t.trim_examples,
        ]
        for t in s.tasks
    ]
    L += md_table([*head, "new tokens", "trim ex."], body, "lllrrrrrrr")
    L += [
        f"Every run: LoRA r={s.rank}, α={s.alpha:g} on {s.roles}; AdamW lr {s.lr:g}, constant; "
        f"{s.steps} steps; "
        f"training seed {s.seed} (repeats: {', '.join(map(str, s.repeat_seeds))}); a seeded subset of "
        f"{s.train_examples} training examples; card on {s.card_examples} training examples.",
        "",
    ]
    L += [f"- {w}" for w in out["why"]] + [f"- {t.name}: {t.why}" for t in s.tasks if t.why] + [""]
    est = out.get("estimate")
    if est:
        L += [
            f"Planned: {est['runs']} runs, estimated {est['hours']:.2f} h on 2 CPU cores "
            "(`--estimate`; constants in the JSON).",
            "",
        ]
    if out["cards"]:
        body = []
        for t, c in out["cards"].items():
            tm, cm = c["timings"], c.get("cost_model") or {}
            body.append(
                [
                    t,
                    fmt(tm.get("total_s"), ".0f"),
                    fmt(tm.get("probe_s"), ".0f"),
                    fmt(tm.get("coupling_s"), ".0f"),
                    fmt(tm.get("calibrate_s"), ".0f"),
                    fmt(cm.get("intercept_s"), ".2f"),
                    fmt(cm.get("per_layer_backward_s"), ".3f"),
                    fmt(cm.get("per_module_s"), ".4f"),
                ]
            )
        L += ["Cards (seconds; cost model t = a + b·(30 − min S) + c·modules at the card's batch):", ""]
        L += md_table(["task", "card s", "probe s", "coupling s", "calibration s", "a", "b", "c"], body)
    return L


def _protocol(s: Settings) -> Lines:
    return [
        "## Protocol",
        "",
        f"1. Single-layer runs at layers {', '.join(map(str, s.single_layers))} on every task; "
        "measured gain = "
        "base test loss − test loss after training that layer alone.",
        f"2. On {' and '.join(s.select_tasks)} only: Spearman of each predicted-gain score with those "
        "gains; the "
        "best mean is frozen (`placement_default_score.json`) and never replaced without `--refreeze`, which "
        "records the before/after numbers.",
        f"3. The frozen score is reported unchanged on {' and '.join(s.confirm_tasks)}.",
        "4. The card policies of the budget grid use the frozen score.",
        "5. A difference between two policies counts as real only when it exceeds the spread (max − min) "
        "over 3 training seeds of the repeated policies on that task (gsm8k and samsum have no repeats: the "
        "largest spread of the other two tasks is used).",
        "",
    ]


def _predicts(out: dict[str, Any], s: Settings, task_names: tuple[str, ...]) -> Lines:
    """Section 1: the frozen score, every score's Spearman and the measured single-layer drops."""
    frozen = out["frozen_default"]
    L: Lines = ["## 1. Does the card predict? Single-layer runs", ""]
    if frozen:
        v = frozen["variant"]
        L += [
            f"**Frozen default score: `{v['name']}`** "
            f"(mean Spearman {fmt(frozen['mean_spearman'], '+.3f')} on "
            f"{', '.join(frozen['selected_on'])}; frozen {frozen['created']})"
            + (
                f", adopted from {frozen['frozen_by']}: the mean is the CPU runs'."
                if frozen.get("frozen_by")
                else "."
            )
            + (" Here every task's Spearman is a confirmation." if s.profile == "gpu" else ""),
            "",
        ]
    else:
        L += ["No default score frozen yet (`select` has not run).", ""]
    sp = out["spearman_single_layer"]
    tasks = [t for t in task_names if sp.get(t)]
    if tasks:
        L += _spearman_tables(sp, frozen, s, tasks)
    return L + _placement_spearman(out, s)


def _spearman_tables(
    sp: dict[str, Any], frozen: dict[str, Any] | None, s: Settings, tasks: list[str]
) -> Lines:
    sel = [t for t in s.select_tasks if t in tasks]
    conf = [t for t in s.confirm_tasks if t in tasks]
    body = []
    for n in [v.name for v in variants(s)]:
        vals = {t: sp[t]["variants"][n]["spearman"] for t in tasks}
        ms, mc = (
            mean_or_none([vals[t] for t in group])
            if group and all(vals[t] is not None for t in group)
            else None
            for group in (sel, conf)
        )
        star = " **(frozen)**" if frozen and frozen["variant"]["name"] == n else ""
        means = (fmt(ms, "+.3f"), fmt(mc, "+.3f"))
        body.append([f"`{n}`{star}", *(fmt(vals[t], "+.3f") for t in tasks), *means])
    L: Lines = [
        "Spearman of each score (per layer, q+v) with the measured single-layer test-loss drop (n = "
        f"{len(s.single_layers)} layers per task). Selection used only "
        f"{', '.join(s.select_tasks)}; the confirm columns were not looked at when choosing.",
        "",
    ]
    L += md_table(["score", *tasks, "mean (select)", "mean (confirm)"], body)
    if frozen:
        fz = frozen["variant"]["name"]
        for t in conf:
            rho = sp[t]["variants"][fz]["spearman"]
            L += [f"- Confirmation on {t}: frozen `{fz}` Spearman **{fmt(rho, '+.3f')}**."]
        L += [""]
    layers = sorted({k for t in tasks for k in sp[t]["layers"]})
    drops = {t: dict(zip(sp[t]["layers"], sp[t]["measured_drop"], strict=True)) for t in tasks}
    body = [[k, *(fmt(drops[t][k], ".4f") if k in sp[t]["layers"] else "–" for t in tasks)] for k in layers]
    L += ["Measured single-layer test-loss drops:", ""]
    return L + md_table(["layer", *(f"{t} drop" for t in tasks)], body)


def _placement_spearman(out: dict[str, Any], s: Settings) -> Lines:
    pp = {t: p for t, p in out["spearman_placements"].items() if p}
    if not pp:
        return []
    L: Lines = [
        "Predicted set gain (§4, coupled) vs measured loss drop over each task's distinct placements "
        "(budget grid, training seed 0): Spearman, coupled / additive.",
        "",
    ]
    head = ["score", *(f"{t} (n={p['n_placements']})" for t, p in pp.items())]
    body = [
        [
            f"`{n}`",
            *(
                f"{fmt(p['variants'][n]['spearman_coupled'], '+.2f')} / "
                f"{fmt(p['variants'][n]['spearman_additive'], '+.2f')}"
                for p in pp.values()
            ),
        ]
        for n in [v.name for v in variants(s)]
    ]
    return L + md_table(head, body)


def _budgets(out: dict[str, Any], task_names: tuple[str, ...]) -> Lines:
    """Section 2: every task's grid, with one verdict per budget."""
    L: Lines = ["## 2. Placement at a budget", ""]
    for t in task_names:
        sm = out["summary"].get(t)
        if not sm:
            L += [f"### {t}", "", "No base-model result yet.", ""]
            continue
        b = sm["base"]
        mname = b.get("metric_name") or "metric"
        a = sm["all30"]
        L += [
            f"### {t}",
            "",
            f"Base model: test loss {fmt(b['test_loss'], '.4f')}, {mname} {fmt(b['metric'], '.4f')}. "
            f"All-30: test loss {fmt(a['test_loss'], '.4f')}, {mname} {fmt(a['metric'], '.4f')}, "
            f"{fmt(a['s_per_step'], '.2f')} s/step, {fmt(a['peak_memory_mib'], '.0f')} MiB, "
            f"{fmt(int(a['trainable_params']) if a['trainable_params'] else None, ',')} trainable params.",
            "",
        ]
        L += _grid_table(out["rows"], t, mname)
        for bud, e in sm["budgets"].items():
            L += [_verdict(t, bud, e)]
        L += [""]
    return L


def _grid_table(all_rows: list[dict[str, Any]], task: str, mname: str) -> Lines:
    rows = sorted(
        (r for r in all_rows if r["task"] == task and r["group"] == "grid"),
        key=lambda r: (r["budget"] or 99, POLICY_ORDER.index(r["policy"]), r["plan_seed"]),
    )
    body = []
    for r in rows:
        pol = r["policy"] + (f" (seed {r['plan_seed']})" if r["policy"] == "random" else "")
        pr = r.get("predicted") or {}
        frac = r.get("fraction_of_all30")
        body.append(
            [
                r["budget"] or "all",
                pol,
                layers_text(r.get("layers", [])) if r.get("layers") else "–",
                fmt(r.get("trainable_params"), ","),
                fmt(r.get("s_per_step"), ".2f"),
                fmt(r.get("peak_memory_mib"), ".0f"),
                fmt(r.get("test_loss"), ".4f"),
                fmt(r.get("metric"), ".4f"),
                fmt(r.get("drop"), ".4f"),
                fmt(100 * frac, ".0f") if frac is not None else "–",
                fmt(pr.get("fraction"), ".2f"),
                r["status"] if r["status"] != "done" else "",
            ]
        )
    head = ["budget", "policy", "layers", "params", "s/step", "peak MiB", "test loss", mname, "loss drop"]
    return md_table([*head, "% of all-30", "pred. fraction", "status"], body, "llllrrrrrrrl")


def _verdict(task: str, budget: str, e: dict[str, Any]) -> str:
    """One plain sentence per budget on whether `card` won, and whether the margin is beyond noise."""
    if "card_rank_loss" not in e:
        return f"- budget {budget}: no `card` result yet."
    thr = e.get("noise_threshold")
    d = e.get("loss_diff_vs_best_other")
    if d is None:
        return f"- budget {budget}: `card` is the only policy measured so far."
    real = e.get("difference_real")

    def judged(if_real: str, if_noise: str) -> str:
        if thr is None:
            return "no seed spread measured yet, so whether it is real is not known"
        return f"seed spread {fmt(thr, '.4f')}: {if_real if real else if_noise}"

    gap = e.get("card_gap_to_all30_pct")
    tail = f" Its gap to all-30 is {fmt(gap, '.0f')}% of the all-30 improvement." if gap is not None else ""
    part = "" if e.get("complete") else " (not every policy measured yet)"
    if e.get("card_ties"):
        return (
            f"- budget {budget}: `card` ties with `{e['best_other']}` for the lowest test loss{part}.{tail}"
        )
    if e.get("card_wins"):
        return (
            f"- budget {budget}: `card` has the lowest test loss{part}, {fmt(-d, '.4f')} below "
            f"`{e['best_other']}` ({judged('a real lead', 'within noise, so not a real win')}).{tail}"
        )
    return (
        f"- budget {budget}: **`card` does not win on {task}**{part}: `{e['best_other']}` is better by "
        f"{fmt(d, '.4f')} test loss ({judged('a real difference', 'within noise')}); "
        f"`card` ranks {e['card_rank_loss']} of {e['n_policies']}.{tail}"
    )


def _seeds(out: dict[str, Any], s: Settings, task_names: tuple[str, ...]) -> Lines:
    """Section 3: the training-seed spread of the repeated policies, and the noise thresholds."""
    L: Lines = ["## 3. Training-seed spread", ""]
    body = []
    for t in task_names:
        sm = out["summary"].get(t)
        if not sm or s.task(t).grid != "full":
            continue
        for p, e in sm["seeds"]["policies"].items():
            tl, mt = e.get("test_loss", {}), e.get("metric", {})
            body.append(
                [
                    t,
                    p,
                    e["n"],
                    f"{fmt(tl.get('mean'), '.4f')} ± {fmt(tl.get('std'), '.4f')}",
                    fmt(tl.get("range"), ".4f"),
                    f"{fmt(mt.get('mean'), '.4f')} ± {fmt(mt.get('std'), '.4f')}",
                    fmt(mt.get("range"), ".4f"),
                ]
            )
    if not body:
        return L + ["No seed repeats yet.", ""]
    head = ["task", "policy (budget 8 / all)", "seeds", "test loss mean ± sd", "range", "metric mean ± sd"]
    L += md_table([*head, "range"], body)
    for t in task_names:
        L += _noise_lines(out["summary"].get(t), s, t)
    return L + [""]


def _noise_lines(sm: dict[str, Any] | None, s: Settings, t: str) -> Lines:
    L: Lines = []
    if sm and sm.get("noise"):
        L += [
            f"- {t}: noise threshold (test loss) {fmt(sm['noise'].get('test_loss'), '.4f')}, "
            + (
                f"(metric) {fmt(sm['noise'].get('metric'), '.4f')}"
                if sm["noise"].get("metric") is not None
                else "(metric) not known without repeats on this task"
            )
            + f" — {sm['noise_source']}."
        ]
    sd = (sm or {}).get("seed_means")
    if sd:
        real = {True: "beyond", False: "within", None: "no"}[sd["difference_real"]]
        who = (
            f"`card` beats `{sd['best_other']}` by {fmt(-sd['loss_diff_vs_best_other'], '.4f')}"
            if sd["loss_diff_vs_best_other"] < 0
            else f"**`card` does not win**: `{sd['best_other']}` is better by "
            f"{fmt(sd['loss_diff_vs_best_other'], '.4f')}"
        )
        L += [
            f"  - {t}, means over seeds at budget {s.repeat_budget}: {who} ({real} the seed spread); "
            f"card's gap to all-30 {fmt(sd.get('card_gap_to_all30_pct'), '.0f')}% of its improvement."
        ]
    return L


def _closing_numbers(out: dict[str, Any], task_names: tuple[str, ...]) -> Lines:
    """Section 4: card's rank, gap and relative cost per task and budget."""
    yes_no = {True: "yes", False: "no", None: "–"}
    body = []
    for t in task_names:
        sm = out["summary"].get(t)
        for bud, e in (sm or {}).get("budgets", {}).items():
            body.append(
                [
                    t,
                    bud,
                    f"{e.get('card_rank_loss', '–')}/{e['n_policies']}",
                    f"{e.get('card_rank_metric', '–')}/{len(e['ranking_metric'])}",
                    fmt(e.get("card_gap_to_all30_pct"), ".0f"),
                    fmt(e.get("card_s_per_step_rel_all30"), ".2f"),
                    fmt(e.get("card_peak_memory_rel_all30"), ".2f"),
                    yes_no[e.get("card_wins")],
                    yes_no[e.get("difference_real")],
                ]
            )
    head = ["task", "budget", "card rank (loss)", "card rank (metric)", "gap to all-30 (% of its drop)"]
    head += ["s/step vs all-30", "peak mem vs all-30", "card best?", "beyond seed spread?"]
    return ["## 4. Summary: the numbers for the closing note", "", *md_table(head, body)]


def _trims(out: dict[str, Any]) -> Lines:
    """Section 5: the boundary chosen for each all-30 run, and what trimming cost or saved."""
    body = []
    for t, tr in out["trim"].items():
        if not tr:
            continue
        sel, te = tr["selection_set"], tr["test"]
        after = te["after"] or {}
        body.append(
            [
                t,
                tr["chosen_k"],
                f"{tr['layers_before']} → {tr['layers_after']}",
                f"{tr['modules_before']} → {tr['modules_after']}",
                f"{fmt(te['before']['test_loss'], '.4f')} → {fmt(after.get('test_loss'), '.4f')}",
                f"{fmt(te['before']['metric'], '.4f')} → {fmt(after.get('metric'), '.4f')}",
                f"{fmt(sel['s_per_example_before'], '.3f')} → {fmt(sel['s_per_example_after'], '.3f')}",
            ]
        )
    L: Lines = ["## 5. Trimming the all-30 runs", ""]
    if not body:
        return L + ["No trims yet.", ""]
    L += [
        "Boundary chosen on held-out test examples (disjoint from the evaluation subsets) by the task "
        "metric; test numbers on the same subsets as every other run.",
        "",
    ]
    head = ["task", "K", "layers", "modules", "test loss", "metric", "s/example (selection set)"]
    return L + md_table(head, body)


def _changes(out: dict[str, Any]) -> Lines:
    """Section 6: every refreeze of the default score, and a warning when the card code moved."""
    L: Lines = ["## 6. Changes made after seeing results", ""]
    if out["changes_after_results"]:
        for c in out["changes_after_results"]:
            L += [
                f"- {c['date']}: default score `{c['before']['variant']['name']}` (mean "
                f"{fmt(c['before']['mean_spearman'], '+.3f')}) → `{c['after']['variant']['name']}` (mean "
                f"{fmt(c['after']['mean_spearman'], '+.3f')}); reason: {c['reason']}. Card code "
                f"{str(c['before'].get('card_code_hash'))[:12]} → "
                f"{str(c['after'].get('card_code_hash'))[:12]}."
            ]
        L += [""]
    else:
        L += ["None: the default score was frozen once and the card's definitions did not change since.", ""]
    if out["card_code_note"]:
        L += [f"**Warning: {out['card_code_note']}.**", ""]
    return L


def _reproduce(s: Settings) -> Lines:
    if s.profile == "gpu":
        return [
            "## Reproduce",
            "",
            "One process per task (cards, single, policies, trim; the four share the GPU), then `confirm` "
            "and `report`; resumable:",
            "",
            "```",
            "benchmarks/placement_gpu.sh",
            "```",
            "",
        ]
    return [
        "## Reproduce",
        "",
        "```",
        ".venv/bin/python benchmarks/placement.py --estimate",
        ".venv/bin/python benchmarks/placement.py all            # resumable; or phase by phase:",
        ".venv/bin/python benchmarks/placement.py cards",
        ".venv/bin/python benchmarks/placement.py single --limit-runs 10   # a slice per sitting",
        ".venv/bin/python benchmarks/placement.py select",
        ".venv/bin/python benchmarks/placement.py confirm",
        ".venv/bin/python benchmarks/placement.py policies --tasks e2e_nlg,sst2",
        ".venv/bin/python benchmarks/placement.py policies --tasks gsm8k,samsum",
        ".venv/bin/python benchmarks/placement.py trim",
        ".venv/bin/python benchmarks/placement.py report",
        "```",
        "",
    ]
