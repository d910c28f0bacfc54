"""The runner: the model (loaded once), tasks, cards, plans and runs, each looked up before it is made.

Every stage is the library's: ``compute_card``, ``make_plan`` / ``Plan.restricted``, ``train``, ``trim``
(in phases.py), ``eval_loss`` / ``evaluate``. What is the benchmark's own is the keying: a run's key is the
sha256 of everything its numbers depend on, so placements that pick the same layers share one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from layercard.artifacts import read_json, sha256_json, write_json

from .jobs import Job, Variant
from .ledger import Ledger
from .measure import PeakRss, card_code_hash, cheap_hash, load_avg, now
from .settings import BENCH, CARD_POLICIES, CARDS_SAVED, Settings, TaskSetting
from .text import layers_text
from .tiny import build_tiny_model

PlanOrReason = tuple[Any, str | None]  # (layercard.plan.Plan, None) or (None, why there is no placement)

# Settings CardConfig gained after this benchmark's cards were made, at the value that makes the card those
# cards are (one calibration round, no dropout in it, no weight SNR: the committed cards hold none). At that
# value a setting stays out of the card's key, so the committed cards keep the key they were stored under;
# at any other it enters the key and the card is made again.
CARD_FIELDS_ADDED: dict[str, Any] = {
    "calibrate_rounds": 1, "calibrate_dropout": 0.0, "weight_snr": False, "calibrate_checkpointing": False,
}  # fmt: skip


# Likewise the settings TrainConfig gained after this benchmark's runs (results/placement_runs/) were
# trained, at the value that trains the way they were (PEFT's own initialisation; eva_rho is read only by
# the EVA one): out of a run's key at that value, so every committed run keeps its key.
TRAIN_FIELDS_ADDED: dict[str, Any] = {
    "init": "default", "eva_rho": 2.0, "gradient_checkpointing": False, "keep_best": False,
    "early_stopping": 0, "max_grad_norm": None, "early_stopping_min_delta": 0.0, "group_by_length": False,
}  # fmt: skip


def _without(config: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not (k in added and v == added[k])}


def card_key_config(config: dict[str, Any]) -> dict[str, Any]:
    """The card config as its key reads it: ``config`` without the CARD_FIELDS_ADDED at their value."""
    return _without(config, CARD_FIELDS_ADDED)


def run_key_train(config: dict[str, Any]) -> dict[str, Any]:
    """The training config as a run's key reads it: without the TRAIN_FIELDS_ADDED at their value."""
    return _without(config, TRAIN_FIELDS_ADDED)


class StopBench(Exception):
    """--limit-runs reached."""


class Bench:
    """Holds the model (loaded once), tasks, cards and the frozen score; runs and looks up cached runs."""

    def __init__(
        self,
        settings: Settings,
        root: Path,
        results: Path,
        *,
        tasks: Any,
        only: set[str] | None = None,
        groups: set[str] | None = None,
        limit_runs: int | None = None,
    ) -> None:
        self.s = settings
        self.root = root
        self.results = results
        self.ledger = Ledger(root, results)
        self.task_names = tuple(tasks)
        self.only = only
        self.groups = groups
        self.limit_runs = limit_runs
        self.new_runs = 0
        self._loaded: Any = None
        self._tasks: dict[tuple[str, str], Any] = {}
        self._cards: dict[str, Any] = {}
        self.earlier_code_cards: set[str] = set()  # cards read as made by earlier card code (see card())
        self._plans: dict[Job, PlanOrReason] = {}
        self._base_full: str | None = None
        self._base_cheap: str | None = None
        self.checks = {"cheap": 0, "full": 0}

    # ---- model and tasks -----------------------------------------------------------------------------
    @property
    def loaded(self) -> Any:
        """The base model, loaded on first use (the tiny random one under --dry-run-tiny)."""
        if self._loaded is None:
            import torch

            from layercard.models import load_model, weights_hash

            spec = self.s.model
            if self.s.dry_run:
                torch.set_num_threads(1)  # tiny ops gain nothing from threads, and the machine is shared
                spec = str(build_tiny_model(self.root / "tiny-model", self.s.n_layers))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            t0 = time.perf_counter()
            self._loaded = load_model(spec, device=device)
            self._base_full = weights_hash(self._loaded.model)
            self._base_cheap = cheap_hash(self._loaded.model)
            print(f"loaded {self.s.model} on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
        return self._loaded

    def check_base(self, *, full: bool = False) -> None:
        """The base model must be exactly the unmodified one between runs (train/eval restore it)."""
        from layercard.models import weights_hash

        model = self.loaded.model
        got = cheap_hash(model)
        self.checks["cheap"] += 1
        if got != self._base_cheap:
            raise RuntimeError(
                "the base model changed between runs (q/k/v/o weights, structure or grad flags)"
            )
        if full:
            self.checks["full"] += 1
            if weights_hash(model) != self._base_full:
                raise RuntimeError("the base model's weights changed between runs (full weights hash)")

    def task(self, name: str, which: str) -> Any:
        """The training (``which='train'``) or test split of a task, with the run's prompt cap applied."""
        key = (name, which)
        if key not in self._tasks:
            ts = self.s.task(name)
            spec, split = (
                (ts.train_spec, ts.train_split) if which == "train" else (ts.test_spec, ts.test_split)
            )
            self._tasks[key] = load_capped(spec, split, ts)
        return self._tasks[key]

    # ---- cards ---------------------------------------------------------------------------------------
    def card_config(self, ts: TaskSetting) -> Any:
        """The card's settings, every one the committed cards (RESULTS/placement_cards/) were made with
        pinned here rather than left to CardConfig's defaults, which have changed since (sketch: exact,
        where the default became ``auto``)."""
        from layercard.card import CardConfig

        return CardConfig(
            roles=self.s.roles,
            examples=self.s.card_examples,
            max_length=ts.max_length,
            batch_size=self.s.card_batch_size,
            lora_rank=self.s.rank,
            lora_alpha=self.s.alpha,
            lr=self.s.lr,
            seed=self.s.seed,
            sketch=None,
            coupling=True,
            coupling_examples=self.s.coupling_examples,
            calibrate=True,
            horizon_steps=self.s.steps,
            **CARD_FIELDS_ADDED,
        )

    def _card_key(self, name: str, code: str | None) -> str:
        """A card's identity: its config, model, data, prompt format and the card code that made it."""
        cfg = self.card_config(self.s.task(name))
        train = self.task(name, "train")
        return sha256_json(
            {
                "bench": BENCH,
                "config": card_key_config(dataclasses.asdict(cfg)),
                "model_hash": self.loaded.model_hash,
                "data_hash": train.data_hash,
                "format": train.format.to_dict(),
                "code": code,
            }
        )

    def card_meta(self, name: str) -> dict[str, Any]:
        return read_json(self.root / "cards" / name / "meta.json")

    def card(self, name: str, *, compute: bool = True) -> Any:
        """The task's card, cached under ROOT/cards/TASK/ and keyed by its config, data, model and code.

        A card made by earlier card code is recomputed before anything trains on it; a report
        (``compute=False``) still reads it, since it is the card the recorded runs were planned with.
        """
        if name in self._cards:
            return self._cards[name]
        from layercard.card import Card

        folder = self.root / "cards" / name
        meta_path, card_path = folder / "meta.json", folder / "card.json"
        # Cards are kept beside the results too (committed), so a fresh checkout reuses them.
        saved = self.results / CARDS_SAVED / name
        if not card_path.is_file() and (saved / "card.json").is_file() and (saved / "meta.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved / "card.json", card_path)
            shutil.copyfile(saved / "meta.json", meta_path)
        meta = read_json(meta_path) if card_path.is_file() and meta_path.is_file() else None
        key = self._card_key(name, card_code_hash())
        made_by = (meta or {}).get("code_hash")
        if meta is not None and meta.get("key") == key:
            card = Card.load(card_path)
        elif meta is not None and not compute and meta.get("key") == self._card_key(name, made_by):
            card = Card.load(card_path)
            self.earlier_code_cards.add(name)
        elif not compute:
            return None
        else:
            card = self._compute_card(name, key, meta)
        self._cards[name] = card
        return card

    def _compute_card(self, name: str, key: str, meta: dict[str, Any] | None) -> Any:
        from layercard.card import compute_card

        cfg = self.card_config(self.s.task(name))
        folder = self.root / "cards" / name
        meta_path, card_path = folder / "meta.json", folder / "card.json"
        if card_path.is_file():
            old = (meta or {}).get("key", "unknown")
            kept = folder / f"card.{old[:12]}.json"
            shutil.copyfile(card_path, kept)
            print(f"card {name}: settings or card code changed; recomputing (old card kept as {kept.name})")
        print(
            f"[card] {name}: {cfg.examples} examples × ≤{cfg.max_length} tokens, coupling, calibration",
            flush=True,
        )
        t0, load0 = time.perf_counter(), load_avg()
        card = compute_card(self.loaded, self.task(name, "train"), cfg, progress=False)
        card.save(card_path)
        write_json(
            meta_path,
            {
                "key": key,
                "code_hash": card_code_hash(),
                "wall_s": round(time.perf_counter() - t0, 1),
                "load_avg": [load0, load_avg()],
                "created": now(),
            },
        )
        saved = self.results / CARDS_SAVED / name
        saved.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(card_path, saved / "card.json")
        shutil.copyfile(meta_path, saved / "meta.json")
        self.check_base()
        print(f"  card {name}: {card.timings.get('total_s', 0):.0f} s", flush=True)
        return card

    # ---- the frozen score and plans ------------------------------------------------------------------
    def frozen(self) -> dict[str, Any] | None:
        return self.ledger.frozen()

    def frozen_variant(self) -> Variant | None:
        f = self.frozen()
        return Variant(**f["variant"]) if f else None

    def forget_plans(self) -> None:
        """Card-policy plans made before a new frozen choice are stale."""
        self._plans.clear()

    def _plan_card(self, name: str, variant: Variant | None) -> Any:
        """The card, with its damping set to the frozen variant's δ when that variant has one."""
        card = self.card(name)
        if variant is not None and variant.delta is not None:
            card = dataclasses.replace(card, config={**card.config, "delta": variant.delta})
        return card

    def plan(self, job: Job) -> PlanOrReason:
        """(plan, None) or (None, reason) — e.g. no frozen score yet, or a policy with no placement."""
        if job in self._plans:
            return self._plans[job]
        from layercard.errors import LayercardError
        from layercard.plan import Budget, PlanConfig, make_plan

        variant = self.frozen_variant()
        kw = dict(rank=self.s.rank, alpha=self.s.alpha, roles=self.s.roles)
        out: PlanOrReason
        if job.policy == "single":  # a placement no policy names: the all-layer plan cut to one layer
            card = self.card(job.task)
            all_layers = make_plan(card, PlanConfig("all", **kw))
            out = (all_layers.restricted([job.layer], card, policy="single"), None)
        elif variant is None and job.policy in CARD_POLICIES:
            out = (None, "no frozen default score yet (run `select`)")
        else:
            card = self._plan_card(job.task, variant)
            budget = Budget("layers", job.budget) if job.budget is not None else None
            cfg = PlanConfig(
                job.policy, budget=budget, seed=job.plan_seed, score=variant.score if variant else None, **kw
            )
            try:
                out = (make_plan(card, cfg), None)
            except LayercardError as e:
                out = (None, f"no placement: {e}")
        self._plans[job] = out
        return out

    # ---- runs ----------------------------------------------------------------------------------------
    def eval_settings(self, ts: TaskSetting) -> dict[str, Any]:
        return {
            "loss_examples": ts.loss_examples,
            "gen_examples": ts.gen_examples,
            "max_new_tokens": ts.max_new_tokens,
            "max_length": ts.max_length,
            "batch_size": self.s.eval_batch_size,
            "seed": self.s.eval_seed,
        }

    def train_config(self, ts: TaskSetting, seed: int) -> Any:
        from layercard.train import TrainConfig

        return TrainConfig(
            steps=self.s.steps,
            batch_size=ts.batch_size,
            lr=self.s.lr,
            max_length=ts.max_length,
            train_examples=self.s.train_examples,
            eval_examples=0,
            eval_every=0,
            checkpoint_every=0,
            seed=seed,
            **TRAIN_FIELDS_ADDED,
        )

    def run_config(self, job: Job | None, task: str, plan: Any) -> dict[str, Any]:
        """Everything a run's numbers depend on; its sha256 names the run (``job=None``: the base model)."""
        ts = self.s.task(task)
        train, test = self.task(task, "train"), self.task(task, "test")
        cfg: dict[str, Any] = {
            "bench": BENCH,
            "kind": "base" if job is None else "train",
            "model": self.s.model,
            "model_hash": self.loaded.model_hash,
            "task": task,
            "test_data": {"spec": ts.test_spec, "split": ts.test_split, "data_hash": test.data_hash},
            "format": test.format.to_dict(),
            "eval": self.eval_settings(ts),
        }
        if job is not None and plan is not None:
            lc = plan.lora_config
            cfg["train_data"] = {"spec": ts.train_spec, "split": ts.train_split, "data_hash": train.data_hash}
            cfg["train"] = run_key_train(self.train_config(ts, job.train_seed).to_dict())
            cfg["layers"] = sorted(int(x) for x in plan.layers)
            cfg["lora"] = {
                "r": lc["r"],
                "alpha": lc["lora_alpha"],
                "dropout": lc["lora_dropout"],
                "targets": sorted(lc["target_modules"]),
                "rank_pattern": lc.get("rank_pattern") or {},
                "alpha_pattern": lc.get("alpha_pattern") or {},
            }
            cfg["generation"] = job.group != "single"
        return cfg

    def count_new(self, label: str) -> None:
        """Count one new run (or trim) against --limit-runs; stop before it when the limit is reached."""
        if self.limit_runs is not None and self.new_runs >= self.limit_runs:
            raise StopBench(f"--limit-runs {self.limit_runs} reached before {label}")
        self.new_runs += 1

    def result(self, job: Job | None, task: str, *, execute: bool) -> dict[str, Any] | None:
        """The run's cached result; with ``execute`` it is trained and evaluated when missing."""
        plan = None
        if job is not None:
            plan, why = self.plan(job)
            if plan is None:
                return {"status": "no_plan", "reason": why}
        cfg = self.run_config(job, task, plan)
        key = sha256_json(cfg)
        found = self.ledger.run(key)
        if found is not None or not execute:
            return found
        return self._execute(job, task, plan, cfg, key)

    def _execute(
        self, job: Job | None, task: str, plan: Any, cfg: dict[str, Any], key: str
    ) -> dict[str, Any]:
        label = job.label if job is not None else f"{task} · base model"
        self.count_new(label)
        self.ledger.note_machine()
        folder = self.ledger.run_dir(key)
        if folder.exists():  # a crashed run: start over
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(folder / "config.json", cfg)
        layers = cfg.get("layers", [])
        print(f"[run {self.new_runs}] {label}: layers {layers_text(layers)}", flush=True)
        t0, load0 = time.perf_counter(), load_avg()
        res: dict[str, Any] = {"kind": "placement_run", "key": key, "config": cfg, "layers": layers}
        adapter = None
        if job is not None:
            res["train"] = self._train(job, task, plan, folder / "train")
            adapter = folder / "train" / "adapter"
        res["eval"] = self.evaluate(task, adapter, generation=cfg.get("generation", True))
        self.check_base()
        res["base_unchanged_after"] = True
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["load_avg"] = [load0, load_avg()]
        res["created"] = now()
        self.ledger.store_run(key, res)
        ev, tr = res["eval"], res.get("train", {})
        extra = f", {tr['s_per_step']:.2f} s/step" if tr else ""
        metric = ev.get("metric")
        mtxt = f", {ev['metric_name']} {metric:.4g}" if metric is not None else ""
        print(f"  test loss {ev['test_loss']:.4f}{mtxt}{extra}, {res['wall_s']:.0f} s", flush=True)
        return res

    def _train(self, job: Job, task: str, plan: Any, out: Path) -> dict[str, Any]:
        """Train the plan with layercard.train; keep the metrics the report uses, with this run's memory."""
        from layercard.train import train

        with PeakRss() as mem:
            m = train(
                self.loaded,
                plan,
                self.task(task, "train"),
                None,
                self.train_config(self.s.task(task), job.train_seed),
                out,
                progress=False,
            )
        cuda = m.get("peak_memory_kind") == "cuda_max_memory_allocated"
        return {
            "trainable_params": m["trainable_params"],
            "modules": m["plan"]["modules"],
            "s_per_step": m["s_per_step"],
            "tokens_per_s": m["tokens_per_s"],
            "batch_tokens_per_step": m["batch_tokens_per_step"],
            "peak_memory_mib": m["peak_memory_mib"] if cuda else mem.peak_mib,
            "peak_memory_kind": m["peak_memory_kind"] if cuda else "rss_rise_during_train",
            "process_peak_rss_mib": None if cuda else m["peak_memory_mib"],
            "first_train_loss": m["first_train_loss"],
            "final_train_loss": m["final_train_loss"],
            "loss_curve": m["loss_curve"],
            "predicted_step_time_s": m["predicted_step_time_s"],
            "wall_s": m["wall_time_s"],
        }

    def evaluate(self, task: str, adapter: Path | None, *, generation: bool = True) -> dict[str, Any]:
        """Teacher-forced test loss on the loss subset; task metric by generation on the nested gen subset."""
        from layercard.adapters import attached
        from layercard.evaluate import EvalConfig, eval_loss, evaluate

        ts = self.s.task(task)
        test = self.task(task, "test")
        loss_sub = test.subset(ts.loss_examples, seed=self.s.eval_seed)
        out: dict[str, Any] = {"loss_examples": len(loss_sub)}
        base = self.loaded.model
        with attached(base, adapter) if adapter is not None else contextlib.nullcontext(base) as net:
            t0 = time.perf_counter()
            out["test_loss"] = eval_loss(
                net,
                self.loaded.tokenizer,
                loss_sub,
                loss_sub.examples,
                batch_size=self.s.eval_batch_size,
                max_length=ts.max_length,
            )
            out["loss_s"] = round(time.perf_counter() - t0, 2)
            if generation and ts.gen_examples:
                cfg = EvalConfig(
                    examples=ts.gen_examples,
                    batch_size=self.s.eval_batch_size,
                    max_new_tokens=ts.max_new_tokens,
                    loss=False,
                    seed=self.s.eval_seed,
                )
                r = evaluate(self.loaded, test, cfg, model=net, progress=False)
                out.update(
                    metric_name=r.primary_metric,
                    metric=r.metrics[r.primary_metric],
                    metrics=r.metrics,
                    gen_examples=r.n,
                    gen_timing={k: round(float(v), 4) for k, v in r.timing.items()},
                    # the example's id, never its text: the committed ledger holds no dataset text
                    samples=[{"id": p["id"], "prediction": p["prediction"]} for p in r.predictions[:3]],
                )
        return out


def load_capped(spec: str, split: str, ts: TaskSetting) -> Any:
    """A task split with the setting's prompt cap (``max_input_tokens``) applied to its format."""
    from layercard.tasks import load_task

    task = load_task(spec, split=split, seed=ts.data_seed)
    if ts.max_input_tokens is not None:
        task = task.with_format(dataclasses.replace(task.format, max_input_tokens=ts.max_input_tokens))
    return task
