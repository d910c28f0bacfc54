"""train.group_by_length: micro-batches of near-length examples, on constructed streams and a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import FAST, TRAIN, VAL, _loaded, _one_thread, make_plan  # noqa: F401  (a fixture: one thread)

from layercard.errors import LayercardError
from layercard.tasks import Encoded, EncodedTask
from layercard.train import TrainConfig, estimate, train
from layercard.train.data import GROUP_WINDOW, Stream


def _encoded(lengths: list[int]) -> list[Encoded]:
    # the example's index as its first token, so a batch says which examples it holds
    return [Encoded((i,) + (0,) * (n - 1), (i,) + (0,) * (n - 1), 0) for i, n in enumerate(lengths)]


def _lengths(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rows(stream: Stream, k: int) -> list[int]:
    batch = stream.batch(k)
    return batch["input_ids"][:, 0].tolist()


def test_every_epoch_holds_each_example_once_in_batches_of_the_set_size():
    lengths = _lengths(1003)  # three windows of 50 micro-batches of 8, the last short, its last batch of 3
    stream = Stream(_encoded(lengths), 8, 0, seed=3, group_by_length=True)
    assert stream.per_epoch == 126
    for epoch in range(2):
        rows = [_rows(stream, epoch * stream.per_epoch + k) for k in range(stream.per_epoch)]
        assert sorted(j for r in rows for j in r) == list(range(1003))
        assert [len(r) for r in rows] == [8] * 125 + [3]


def test_a_window_is_cut_into_batches_of_adjoining_lengths_in_shuffled_order():
    lengths = _lengths(2 * GROUP_WINDOW * 4)
    stream = Stream(_encoded(lengths), 4, 0, seed=1, group_by_length=True)
    for w in range(2):
        batches = [[lengths[j] for j in _rows(stream, w * GROUP_WINDOW + i)] for i in range(GROUP_WINDOW)]
        by_size = sorted(batches, key=max, reverse=True)
        # each batch's shortest is at least the next batch's longest: the window was sorted, then cut
        assert all(min(a) >= max(b) for a, b in zip(by_size, by_size[1:], strict=False))
        assert batches != by_size  # and the batches' order shuffled, not longest to shortest


def test_grouping_cuts_the_padded_positions_and_keeps_the_tokens():
    lengths = _lengths(800)
    plain = Stream(_encoded(lengths), 8, 0, seed=0)
    grouped = Stream(_encoded(lengths), 8, 0, seed=0, group_by_length=True)
    ks = range(plain.per_epoch)
    tokens = [sum(int(grouped.batch(k)["attention_mask"].sum()) for k in ks)]
    assert tokens == [sum(lengths)]
    padded, packed = sum(plain.positions(k) for k in ks), sum(grouped.positions(k) for k in ks)
    assert packed < 0.75 * padded  # lengths 1..199 at random: about half of a random batch is padding
    assert [grouped.positions(k) for k in ks] == [grouped.batch(k)["input_ids"].numel() for k in ks]
    same = Stream(_encoded([5] * 40), 4, 0, seed=0, group_by_length=True)
    assert sum(same.positions(k) for k in range(10)) == 40 * 5


def test_the_grouped_stream_is_a_pure_function_of_the_seed():
    lengths = _lengths(600)
    ks = [0, 7, 80, 75, 150, 151, 3, 299, 160]  # any order, across windows and epochs

    def rows(seed: int, order: list[int]) -> dict[int, list[int]]:
        stream = Stream(_encoded(lengths), 4, 0, seed=seed, group_by_length=True)
        return {k: _rows(stream, k) for k in order}

    assert rows(0, ks) == rows(0, sorted(ks))
    assert rows(0, ks) != rows(1, ks)
    # the epochs differ from each other too
    again = rows(0, list(range(300)))
    assert [again[k] for k in range(150)] != [again[150 + k] for k in range(150)]


def test_off_the_stream_is_as_before():
    """Without grouping the epoch is the seed's permutation cut in order, as every stored run trained."""
    lengths = _lengths(40)
    stream = Stream(_encoded(lengths), 4, 0, seed=5)
    first = torch.randperm(40, generator=torch.Generator().manual_seed(5)).tolist()
    assert [j for k in range(10) for j in _rows(stream, k)] == first


def test_a_large_task_encodes_the_windows_the_run_reads():
    """Grouping reads the lengths of each window a run draws from: those examples are encoded, the rest
    of a large training set is not."""
    from tiny_tok import tiny_tokenizer

    from layercard.tasks import load_task

    task = load_task("synthetic:facts", split="train")
    enc = EncodedTask(tiny_tokenizer(), task, max_length=64)
    stream = Stream(enc, 2, 0, seed=0, group_by_length=True)
    assert len(task) > 4 * GROUP_WINDOW
    needed = stream.run_indices(3)  # three micro-batches: all in the first window
    assert len(needed) == 2 * GROUP_WINDOW
    enc.fill(needed)
    held = {j for k in range(3) for j in stream._indices(k)}
    assert held <= set(needed)
    assert len(enc.read()) == 2 * GROUP_WINDOW  # building them encoded nothing more
    assert stream.run_indices(GROUP_WINDOW + 1) == sorted(stream._order(0)[: 4 * GROUP_WINDOW])


# ---------------------------------------------------------------------------------------------------------
# On a tiny model
# ---------------------------------------------------------------------------------------------------------


def _cfg(**settings) -> TrainConfig:
    return TrainConfig(**{**FAST, "steps": 6, "lr": 1e-2, "train_examples": 16, "batch_size": 2, **settings})


def test_a_grouped_run_trains_on_fewer_positions_and_is_priced_at_them(tmp_path: Path):
    loaded = _loaded()
    plan = make_plan(loaded, [1, 3])
    runs = {}
    for on in (False, True):
        cfg = _cfg(group_by_length=on, steps=8, max_length=120)  # one epoch of 8 micro-batches, none cut
        said = estimate(loaded, plan, TRAIN, VAL, cfg)
        m = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / str(on))
        assert m["batch_positions_per_step"] == pytest.approx(said["positions_per_step"])
        assert m["config"]["group_by_length"] is on
        runs[on] = m
    assert runs[True]["batch_positions_per_step"] < runs[False]["batch_positions_per_step"]
    assert runs[True]["tokens_seen"] == runs[False]["tokens_seen"]  # the same examples, one epoch each
    assert runs[True]["loss_curve"] != runs[False]["loss_curve"]


class Interrupt(Exception):
    pass


def test_a_grouped_run_resumes_as_it_would_have_gone_on_and_refuses_a_change(tmp_path: Path):
    def run(out: Path, *, stop_at: int | None = None, resume: bool = False, **settings) -> dict:
        loaded = _loaded()

        def callback(step: int, _loss: float, _model: torch.nn.Module) -> None:
            if step == stop_at:
                raise Interrupt

        cfg = _cfg(
            **{"group_by_length": True, "steps": 12, "checkpoint_every": 5, "eval_every": 4, **settings}
        )
        return train(
            loaded, make_plan(loaded, [1, 3]), TRAIN, VAL, cfg, out, resume=resume, callback=callback
        )

    full = run(tmp_path / "full")  # 12 micro-batches of 2 over 16 examples: into the second epoch
    with pytest.raises(Interrupt):
        run(tmp_path / "part", stop_at=6)
    with pytest.raises(LayercardError, match="cannot resume: group_by_length was True, now False"):
        run(tmp_path / "part", resume=True, group_by_length=False)
    resumed = run(tmp_path / "part", resume=True)
    assert resumed["resumed_from"] == 5
    for key in ("loss_curve", "val_curve"):
        for (s1, a), (s2, b) in zip(resumed[key], full[key], strict=True):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-6)
