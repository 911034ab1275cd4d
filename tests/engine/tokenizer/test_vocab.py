import json

import pytest

from improv.engine.tokenizer import Tokenizer, TokenizerConfig, TokenType, Vocab
from improv.engine.tokenizer.harmony import parse_label


def test_layout_is_contiguous_and_documented():
    v = Vocab(TokenizerConfig())
    assert v.size == 1586  # docs/tokens.md states this figure
    seen = {v.type_of(i) for i in range(v.size)}
    harmony = {TokenType.METER, TokenType.CHORD, TokenType.HEADER}
    assert seen == set(TokenType) - harmony  # an older checkpoint's layout: no harmony tokens
    with pytest.raises(ValueError, match="0..1585"):
        v.type_of(v.size)
    assert v.name(v.note_on(0, 60)) == "ON_lead_60"
    assert v.name(v.note_off(v.drums, 36)) == "OFF_drums_36"
    assert v.note_of(v.note_on(2, 47)) == (2, 47)


def test_harmony_tokens_are_appended_after_the_notes():
    old, v = Vocab(TokenizerConfig()), Vocab(TokenizerConfig(harmony=True))
    assert v.size == 1771  # docs/tokens.md: 1,586 + BAR BEAT + 181 chords + HEADER HEADER_END
    assert {v.type_of(i) for i in range(v.size)} == set(TokenType)
    assert all(old.name(i) == v.name(i) for i in range(old.size))  # every old id keeps its meaning
    assert [v.name(t) for t in (v.BAR, v.BEAT, v.chord(0), v.HEADER, v.HEADER_END)] == [
        "BAR",
        "BEAT",
        "CHORD_N",
        "HEADER",
        "HEADER_END",
    ]
    assert v.name(v.chord(parse_label("A:min7"))) == "CHORD_A:min7"
    with pytest.raises(ValueError, match="0..1770"):
        v.type_of(v.size)
    assert TokenizerConfig.from_dict({"tick_ms": 10}).harmony is False  # older configs


@pytest.mark.parametrize("ticks", [1, 57, 100, 101, 150, 3200, 3201, 9999, 100_000])
def test_time_tokens_sum_and_are_compact(ticks):
    v = Vocab(TokenizerConfig())
    toks = v.time_tokens(ticks)
    assert sum(v.shift_ticks(t) for t in toks) == ticks
    assert all(v.type_of(t) is TokenType.TIME for t in toks)
    assert len(toks) <= 2 + ticks // (100 * 32)  # a 30 s gap is at most 2 tokens


def test_velocity_bins_roundtrip_within_one_bin():
    v = Vocab(TokenizerConfig())
    bins = [v.velocity_bin(x) for x in range(1, 128)]
    assert bins[0] == 0 and bins[-1] == 31 and bins == sorted(bins)
    for x in range(1, 128):
        b = v.velocity_bin(x)
        assert v.velocity_bin(v.bin_velocity(b)) == b


def test_save_load_roundtrip(tmp_path):
    tok = Tokenizer(TokenizerConfig(velocity_bins=16, parts=("lead", "harmony", "drums")))
    tok.save(tmp_path / "t.json")
    back = Tokenizer.load(tmp_path / "t.json")
    assert back.config == tok.config and back.vocab_size == tok.vocab_size
    assert json.loads((tmp_path / "t.json").read_text())["parts"] == ["lead", "harmony", "drums"]


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"tick_ms": 20}, "tick_ms must be in 1..10"),
        ({"velocity_bins": 8}, "16..128"),
        ({"parts": ("a", "b")}, "must include"),
    ],
)
def test_config_checks(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TokenizerConfig(**kwargs)
