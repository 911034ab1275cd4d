"""Training examples: layouts, loss masks, augmentation, deterministic batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from improv.engine.tokenizer import Note, Tokenizer
from improv.engine.tokenizer.dataset import TokenDataset
from improv.engine.tokenizer.layouts import token_parts
from improv.engine.tokenizer.notes import Notes
from improv.engine.tokenizer.vocab import TokenType
from improv.trainer.data import (
    IGNORE,
    BatchSource,
    DataConfig,
    ExampleBuilder,
    augment,
    censored_waits,
    collate,
    eval_chunks,
    parse_mix,
    swap_stretch,
)


@pytest.fixture
def builder(dataset: Path) -> ExampleBuilder:
    return ExampleBuilder(TokenDataset(dataset), DataConfig(seq_len=256))


def test_continuation_is_plain_next_token(builder: ExampleBuilder) -> None:
    v = builder.vocab
    ex = builder.continuation(np.random.default_rng(0))
    assert ex.ids[0] == v.BOS and ex.ids[1] == v.TASK_CONTINUE
    assert len(ex.ids) <= 257
    assert not ex.loss[0] and ex.loss[1:].all()


def test_solo_continuations_hold_one_part(dataset: Path) -> None:
    b = ExampleBuilder(TokenDataset(dataset), DataConfig(seq_len=256, solo=1.0, pack=False))
    v = b.vocab
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for _ in range(30):
        ex = b.continuation(rng)
        parts = set(token_parts(v, ex.ids).tolist()) - {-1}
        assert len(parts) <= 1, parts
        seen |= parts
    assert len(seen) > 1  # the part kept is drawn, not always the same one
    with pytest.raises(ValueError, match="solo"):
        DataConfig(solo=1.5)


def test_solo_parts_limit_the_part_kept(dataset: Path) -> None:
    """solo_parts=('lead',): a solo window is the melody alone, never the piano or bass alone."""
    cfg = DataConfig(seq_len=256, solo=1.0, solo_parts=("lead",), pack=False)
    b = ExampleBuilder(TokenDataset(dataset), cfg)
    rng = np.random.default_rng(0)
    for _ in range(30):
        parts = set(token_parts(b.vocab, b.continuation(rng).ids).tolist()) - {-1}
        assert parts == {b.vocab.lead}, parts
    with pytest.raises(ValueError, match="unknown parts"):
        ExampleBuilder(TokenDataset(dataset), DataConfig(solo=0.5, solo_parts=("tuba",)))


def test_drop_bass_removes_the_bass_from_a_share_of_windows(dataset: Path) -> None:
    """The conftest songs all have a bass: with drop_bass 0.5 about half the windows lose it,
    in every objective, and nothing else changes."""
    ds = TokenDataset(dataset)
    bass = ExampleBuilder(ds, DataConfig(seq_len=256)).vocab.part_index["bass"]
    for p, lo, hi in ((0.0, 40, 40), (0.5, 10, 30), (1.0, 0, 0)):
        b = ExampleBuilder(ds, DataConfig(seq_len=256, drop_bass=p, pack=False))
        with_bass = 0
        for seed in range(40):
            ex = b.sample(np.random.default_rng(seed))
            v = b.vocab
            played = {v.note_of(t)[0] for t in ex.ids.tolist() if v.type_of(t) is TokenType.NOTE_ON}
            assert v.lead in played
            with_bass += bass in played
        assert lo <= with_bass <= hi, (p, with_bass)
    with pytest.raises(ValueError, match="drop_bass"):
        DataConfig(drop_bass=-0.1)


def test_infill_loss_only_on_generated_middle(builder: ExampleBuilder) -> None:
    v = builder.vocab
    seen_subset = False
    for seed in range(20):
        ex = builder.infill(np.random.default_rng(seed))
        assert ex is not None and ex.objective == "infill"
        ids = ex.ids.tolist()
        assert ids[:2] == [v.BOS, v.TASK_INFILL]
        mid = ids.index(v.FILL_MIDDLE)
        assert ids[-1] == v.FILL_END and ex.loss[-1]  # the model learns to stop
        assert not ex.loss[: mid + 1].any()  # prompt: context without loss
        # the PART tokens right after the task name the target parts
        targets, i = [], 2
        # target PART tokens; the prefix's first event may also open with PART (then PROGRAM)
        while v.type_of(ids[i]) is TokenType.PART and v.type_of(ids[i + 1]) is TokenType.PART:
            targets.append(ids[i] - v.part_base)
            i += 1
        if v.type_of(ids[i]) is TokenType.PART and v.type_of(ids[i + 1]) is not TokenType.PROGRAM:
            targets.append(ids[i] - v.part_base)
        owner = token_parts(v, ids[mid + 1 :])
        loss = ex.loss[mid + 1 :]
        for o, has_loss in zip(owner.tolist(), loss.tolist(), strict=True):
            assert has_loss == (o < 0 or o in targets)  # given parts in the gap: no loss
        seen_subset |= len(targets) < v.n_parts and (~loss).any()
    assert seen_subset  # some gaps regenerate only some parts, with the others forced


def test_accompany_masks_the_lead(builder: ExampleBuilder) -> None:
    v = builder.vocab
    ex = builder.accompany(np.random.default_rng(1))
    assert ex is not None
    assert ex.ids[1] == v.TASK_ACCOMPANY
    parts = token_parts(v, ex.ids.tolist())
    assert (parts == v.lead).any() and (parts != v.lead).any()
    assert not ex.loss[parts == v.lead].any()
    assert ex.loss[1:][parts[1:] != v.lead].all()


def _next_event(v, ids: list[int], j: int) -> int:
    while v.shift_base <= ids[j] < v.part_base:
        j += 1
    return j


def test_accompany_censors_the_waits_cut_by_the_lead(builder: ExampleBuilder) -> None:
    v = builder.vocab
    n_censored = n_free = 0
    for seed in range(10):
        ex = builder.accompany(np.random.default_rng(seed))
        ids, parts = ex.ids.tolist(), token_parts(v, ex.ids.tolist())
        for j, t in enumerate(ids[:-1]):
            if not v.shift_base <= t < v.part_base:
                assert not ex.censor[j]
                continue
            k = _next_event(v, ids, j)
            if k == len(ids):
                continue
            # a wait that ends on a lead event is censored, one that ends on the model's own is not
            assert ex.censor[j] == (parts[k] == v.lead)
            n_censored += bool(ex.censor[j])
            n_free += not ex.censor[j]
    assert n_censored > 10 and n_free > 10


def test_swap_stretch_moves_another_stretchs_accompaniment() -> None:
    v = Tokenizer().vocab
    H = v.part_index["harmony"]
    rows = []  # a harmony note of its own pitch every half second, under a lead and drums
    for i in range(40):
        t = 0.5 * i
        rows += [(t, t + 0.4, 72, 90, v.lead, 0), (t, t + 1.0, 30 + i, 60, H, 0)]
        rows += [(t, t + 0.1, 36, 100, v.drums, 0)]
    notes = Notes.from_list([Note(*r) for r in rows])
    for seed in range(10):
        out, a, b = swap_stretch(notes, v, 3.0, np.random.default_rng(seed))
        assert b == pytest.approx(a + 3.0)
        for part in (v.lead, v.drums):  # only the accompaniment's pitched parts move
            same = notes.select(notes.part == part)
            got = out.select(out.part == part)
            assert np.array_equal(got.start, same.start) and np.array_equal(got.pitch, same.pitch)
        h = out.select(out.part == H)
        tick = 1.0 / v.ticks_per_second  # the stretch: onset ticks a .. b - 1
        inside = (h.start >= a) & (h.start < b - tick)
        orig = notes.select(notes.part == H)
        keep = (orig.start < a) | (orig.start >= b - tick)
        assert np.array_equal(h.select(~inside).pitch, orig.select(keep).pitch)
        moved = h.select(inside)
        assert len(moved) >= 4
        # the pitches of another stretch, at least a second (2 notes) away, ended before b
        offset = moved.pitch - (30 + np.rint(moved.start / 0.5))
        assert len(set(offset.tolist())) == 1 and abs(offset[0]) >= 2
        assert (moved.end < b).all() and (moved.end > moved.start).all()


def test_swapped_accompaniment_has_no_loss_inside_its_stretch(dataset: Path) -> None:
    plain = ExampleBuilder(TokenDataset(dataset), DataConfig(seq_len=512))
    swap = ExampleBuilder(TokenDataset(dataset), DataConfig(seq_len=512, swap=1.0))
    v = swap.vocab
    n_swapped = 0
    for seed in range(10):
        ex = plain.accompany(np.random.default_rng(seed))
        owner = token_parts(v, ex.ids)
        assert ex.loss[1:][owner[1:] != v.lead].all()  # no swap: loss on all but the lead
        ex = swap.accompany(np.random.default_rng(seed))
        owner = token_parts(v, ex.ids)
        tick = np.cumsum(v.ticks_table[ex.ids])
        off = np.flatnonzero(~ex.loss & (owner != v.lead))[1:]  # [0]: BOS
        if len(off) == 0:
            continue
        n_swapped += 1
        lo, hi = tick[off].min(), tick[off].max()
        assert hi - lo <= 8 * v.ticks_per_second
        # one stretch of time: inside it nothing but the lead's tokens has loss, outside all do
        inside = (tick >= lo) & (tick <= hi)
        assert not ex.loss[inside].any()
        assert ex.loss[1:][~inside[1:] & (owner[1:] != v.lead)].all()
    assert n_swapped >= 5
    with pytest.raises(ValueError, match="swap"):
        DataConfig(swap=2.0)


def test_infill_censors_waits_before_given_events_and_the_gap_end(
    builder: ExampleBuilder,
) -> None:
    v = builder.vocab
    seen_given = False
    for seed in range(20):
        ex = builder.infill(np.random.default_rng(seed))
        ids = ex.ids.tolist()
        mid = ids.index(v.FILL_MIDDLE)
        assert not ex.censor[: mid + 1].any()
        for j in range(mid + 1, len(ids)):
            if not v.shift_base <= ids[j] < v.part_base:
                assert not ex.censor[j]
                continue
            k = _next_event(v, ids, j)
            stop = ids[k] == v.FILL_END or not ex.loss[k]
            assert ex.censor[j] == stop
            seen_given |= stop and ids[k] != v.FILL_END
        last = ids.index(v.FILL_END) - 1  # the wait until the gap's end (notes cut there: OFFs)
        assert ex.censor[last] == (v.shift_base <= ids[last] < v.part_base)
    assert seen_given


def test_censored_waits_end_of_sequence_is_not_censored(builder: ExampleBuilder) -> None:
    v = builder.vocab
    ids = np.array([v.BOS, v.TASK_ACCOMPANY, v.shift(5), v.long(2), v.shift(3)])
    stops = np.zeros(len(ids), dtype=bool)
    assert not censored_waits(v, ids, stops).any()
    ids = np.append(ids, v.EOS)
    stops = np.append(stops, True)
    assert censored_waits(v, ids, stops).tolist() == [False, False, True, True, True, False]


def test_augment_keeps_drums_and_ranges(builder: ExampleBuilder, song) -> None:
    v = builder.vocab
    n = Notes.from_list(song(3))
    cfg = DataConfig(transpose=5, stretch=0.1, velocity=0.2)
    for seed in range(5):
        a = augment(n, v, cfg, np.random.default_rng(seed))
        assert len(a) == len(n)  # nothing falls off the keyboard here
        drums = n.part == v.drums
        assert np.array_equal(a.pitch[drums], n.pitch[drums])
        shift = set((a.pitch[~drums] - n.pitch[~drums]).tolist())
        assert len(shift) == 1 and abs(shift.pop()) <= 5
        ratio = a.start[1:] / np.maximum(n.start[1:], 1e-9)
        assert np.allclose(ratio[n.start[1:] > 0], ratio[n.start[1:] > 0][0])
        assert 0.9 - 1e-9 <= ratio[-1] <= 1.1 + 1e-9
        assert a.velocity.min() >= 1 and a.velocity.max() <= 127


def test_collate_shifts_and_masks(builder: ExampleBuilder) -> None:
    ex = builder.accompany(np.random.default_rng(2))
    b = collate([ex], 256)
    x, y = b["input"][0], b["target"][0]
    n = len(ex.ids) - 1
    assert torch.equal(x[:n], torch.as_tensor(ex.ids[:-1]))
    keep = torch.as_tensor(ex.loss[1:])
    assert torch.equal(y[:n][keep], torch.as_tensor(ex.ids[1:])[keep])
    assert (y[:n][~keep] == IGNORE).all() and (y[n:] == IGNORE).all()
    c = b["censor"][0]
    assert torch.equal(c[:n], torch.as_tensor(ex.censor[1:] & ex.loss[1:])) and c.any()
    assert not c[n:].any()


def test_batches_are_a_function_of_position(dataset: Path) -> None:
    cfg = DataConfig(seq_len=128, mix=parse_mix("continue=1,infill=1,accompany=1"))
    a = BatchSource(str(dataset), cfg, 3, seed=7, rank=0)
    b = BatchSource(str(dataset), cfg, 3, seed=7, rank=0)
    other_rank = BatchSource(str(dataset), cfg, 3, seed=7, rank=1)
    assert torch.equal(a[5]["input"], b[5]["input"])
    assert not torch.equal(a[5]["input"], a[6]["input"])
    assert not torch.equal(a[5]["input"], other_rank[5]["input"])


def test_eval_chunks_cover_every_token_once(dataset: Path) -> None:
    ds = TokenDataset(dataset)
    chunks = eval_chunks(ds, 100)
    assert sum(len(c) - 1 for c in chunks) == sum(f["token_count"] - 1 for f in ds.files)
    assert len(eval_chunks(ds, 100, max_chunks=3)) == 3


def test_parse_mix_rejects_unknown() -> None:
    assert parse_mix("continue=2,infill=1") == {"continue": 2.0, "infill": 1.0}
    with pytest.raises(ValueError, match="objective"):
        parse_mix("melody=1")


# --- harmony and meter ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmony_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Songs with a chord-lab file beside each and a 120-bpm tempo map, plus a drums-only file."""
    from improv.engine.tokenizer import TokenizerConfig
    from improv.engine.tokenizer.dataset import build_dataset

    from .conftest import song

    folder = tmp_path_factory.mktemp("harmony")
    tok = Tokenizer(TokenizerConfig(harmony=True))
    paths = []
    for i in range(3):
        p = folder / f"song{i}.mid"
        notes = [n for n in song(i, 16.0) if n.part != 4]  # a band without drums
        tok.notes_to_midi(notes).save(p)
        p.with_suffix(".lab").write_text("0 2 C:maj\n2 4 A:min\n4 6 F:maj\n6 8 G:7\n" * 1)
        paths.append(p)
    drums = folder / "drums.mid"
    tok.notes_to_midi([n for n in song(9, 16.0) if n.part == 4]).save(drums)
    paths.append(drums)
    out = folder / "ds"
    build_dataset(paths, out, tok, workers=1, progress=False)
    return out


def test_windows_carry_their_chords_transposed_and_stretched(harmony_dataset: Path) -> None:
    from improv.engine.tokenizer.harmony import chord_of
    from improv.trainer.data import augment_marked

    ds = TokenDataset(harmony_dataset)
    v = ds.tokenizer.vocab
    notes, marks = ds.file_notes(0), ds.file_marks(0)
    cfg = DataConfig(transpose=5, stretch=0.1)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, m = augment_marked(notes, marks, v, cfg, rng)
        k = int(np.random.default_rng(seed).integers(-5, 6))  # the same first draw
        assert int(a.pitch[a.part == 0][0]) - int(notes.pitch[notes.part == 0][0]) == k
        roots = [chord_of(int(x))[0] for x in m.chords.value]
        assert roots == [(r + k) % 12 for r in (0, 9, 5, 7)]
        f = a.start[1] / notes.start[1]
        assert np.allclose(m.time, marks.time * f)


def test_headers_name_the_parts_to_play_and_carry_no_loss(harmony_dataset: Path) -> None:
    ds = TokenDataset(harmony_dataset)
    v = ds.tokenizer.vocab
    b = ExampleBuilder(ds, DataConfig(seq_len=512, strip_header=0.0, header_programs=1.0))
    ex = b.accompany(np.random.default_rng(1))
    assert ex is not None
    end = list(ex.ids).index(v.HEADER_END)
    assert ex.ids[2] == v.HEADER and not ex.loss[2 : end + 1].any() and ex.loss[end + 1]
    named = {v.name(int(t)) for t in ex.ids[3:end]}
    assert "PART_lead" not in named and {"PART_harmony", "PART_bass"} <= named
    ex = b.continuation(np.random.default_rng(2))
    end = list(ex.ids).index(v.HEADER_END)
    assert ex.ids[2] == v.HEADER and not ex.loss[2 : end + 1].any()
    assert {v.name(int(t)) for t in ex.ids if v.type_of(int(t)).name in ("METER", "CHORD")}


def test_stripping_removes_marks(harmony_dataset: Path) -> None:
    ds = TokenDataset(harmony_dataset)
    v = ds.tokenizer.vocab
    cfg = DataConfig(seq_len=512, strip_chords=1.0, strip_beats=1.0, strip_header=1.0)
    ex = ExampleBuilder(ds, cfg).continuation(np.random.default_rng(0))
    assert not any(v.type_of(int(t)).name in ("METER", "CHORD", "HEADER") for t in ex.ids)


def test_drum_overlay_lays_a_drum_part_on_the_beats(harmony_dataset: Path) -> None:
    ds = TokenDataset(harmony_dataset)
    v = ds.tokenizer.vocab
    b = ExampleBuilder(ds, DataConfig(seq_len=1024, drum_overlay=1.0, strip_beats=0.0))
    assert b._drum_files == [3]
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(8):
        i, w, m, _ = b._pick(rng, 1.0)
        if i == 3:
            continue  # the drums file itself
        checked += 1
        assert (w.part == v.drums).any() and (w.part == v.lead).any()
        beats = m.time[m.kind != 2]
        hits = w.start[w.part == v.drums]
        # the source drums hit on its beats (every 0.5 s): so do the laid ones, on these beats
        near = np.abs(hits[:, None] - beats[None, :]).min(axis=1)
        assert np.median(near) < 0.02
    assert checked


def test_grow_vocab_keeps_every_old_logit() -> None:
    from improv.engine.config import ModelConfig
    from improv.engine.model import Transformer
    from improv.trainer.loop import grow_vocab

    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", vocab_size=100)).eval()
    x = torch.randint(0, 100, (2, 12))
    before = m(x)
    grow_vocab(m, 120)
    after = m(x)
    assert after.shape[-1] == 120 and m.config.vocab_size == 120
    torch.testing.assert_close(after[..., :100], before)
