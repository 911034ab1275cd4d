"""ONNX backend: exported decode step == torch (logits within 1e-4 relative, greedy equal)."""

from __future__ import annotations

import pytest
import torch

from improv.cli import main
from improv.engine.decoder import TorchDecoder
from improv.engine.engine import Engine
from improv.engine.onnx_backend import (
    INT8_FILE,
    ONNX_FILE,
    OnnxDecoder,
    build_onnx,
    ensure_onnx,
    export_onnx,
    onnx_format,
    quantize_int8,
)

pytest.importorskip("onnxruntime")

PROMPTS = [[1, 3], [1, 3, 500, 600, 10, 20, 1000], [1, 4, 300]]

# tiny: grouped-query (4 heads / 2 KV heads), tied embeddings; and the other layouts the graph
# builder handles: one KV head per query head, a separate lm_head.
CONFIGS = {"gqa": {}, "mha": {"n_kv_head": 4}, "untied": {"tie_embeddings": False}}


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory, make_model):
    model = make_model()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


@pytest.fixture(scope="module", params=list(CONFIGS))
def config_pair(request, tmp_path_factory, make_model):
    model = make_model(**CONFIGS[request.param])
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_rows_close(a: torch.Tensor, b: torch.Tensor, rows) -> None:
    """(B, T, V) logits of padded rows: compare each row's real tokens only."""
    for r, row in enumerate(rows):
        assert _rel_err(a[r, : len(row)], b[r, : len(row)]) < 1e-4, f"row {r}"


def test_logits_match_torch(onnx_pair):
    model, path = onnx_pair
    ort_dec = OnnxDecoder(path, model.config, max_batch=3)
    pt_dec = TorchDecoder(model, max_batch=3)
    for slots in ([0, 1, 2], [2, 0, 1]):  # packed slots (bound in place) and scattered (gathered)
        ort_dec.reset()
        pt_dec.reset()
        a = ort_dec.extend(slots, PROMPTS, all_logits=True)  # prefill, padded rows
        b = pt_dec.extend(slots, PROMPTS, all_logits=True)
        _assert_rows_close(a, b, PROMPTS)
        for t in range(5):  # decode steps, rows at different lengths
            step = [[100 + 7 * t + r] for r in range(3)]
            assert _rel_err(ort_dec.extend(slots, step), pt_dec.extend(slots, step)) < 1e-4


@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 0, 1]])
def test_prefill_decode_append_crop_match_torch(config_pair, slots):
    """Every path of `extend` against torch: batched prefill, single-token decode, a batched
    multi-token append after a past (first tokens batched, or row by row), single-row append,
    and after a crop."""
    model, path = config_pair
    ort_dec = OnnxDecoder(path, model.config, max_batch=3)
    pt_dec = TorchDecoder(model, max_batch=3)

    def both(slots, rows):
        a = ort_dec.extend(slots, rows, all_logits=True)
        b = pt_dec.extend(slots, rows, all_logits=True)
        _assert_rows_close(a, b, rows)

    both(slots, PROMPTS)  # prefill, rows of 2, 7 and 3 tokens
    both(slots, [[50], [51], [52]])  # decode: past lengths 2, 7, 3
    both(slots, [[60, 61, 62], [63], [64, 65]])  # append after a past: one run per row
    both(slots[:2], [[66, 67, 68, 69], [70]])  # half the rows long: one run per row
    both(slots, [[100], [101, 102, 103], [104]])  # first tokens batched, then the long row
    both(slots[:1], [[71, 72, 73, 74]])  # one row
    for dec in (ort_dec, pt_dec):
        dec.crop(slots[1], 4)  # roll back into the prompt
        dec.crop(slots[2], 0)  # empty: this row restarts from position 0
    assert [ort_dec.length(s) for s in slots] == [pt_dec.length(s) for s in slots] == [15, 4, 0]
    both(slots, [[80], [81], [82]])  # decode after the crop
    both(slots, [[90, 91], [92, 93, 94], [95]])  # append after the crop
    a = ort_dec.extend(slots, [[5], [6], [7]])  # default: (B, V) logits after each row's last token
    b = pt_dec.extend(slots, [[5], [6], [7]])
    assert a.shape == (3, model.config.vocab_size)
    assert _rel_err(a, b) < 1e-4
    both(slots[:2], [[110, 111, 112, 113], [114, 115]])  # both long: one run per row


def test_append_near_max_seq_matches_torch(onnx_pair):
    """A batched append where a short row's padding would run past max_seq (torch clamps the
    padding's positions; the onnx decoder runs such a batch row by row)."""
    model, path = onnx_pair
    S = model.config.max_seq_len
    ort_dec = OnnxDecoder(path, model.config, max_batch=3)
    pt_dec = TorchDecoder(model, max_batch=3)
    seq = torch.randint(0, 1000, (S,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [seq[: S - 2], seq[:10], seq[:20]]
    ort_dec.extend([0, 1, 2], prompts)
    pt_dec.extend([0, 1, 2], prompts)
    rows = [[7], [8, 9, 10], [11, 12]]  # row 0's padding would sit at S - 1 and S
    a = ort_dec.extend([0, 1, 2], rows, all_logits=True)
    _assert_rows_close(a, pt_dec.extend([0, 1, 2], rows, all_logits=True), rows)
    assert [ort_dec.length(s) for s in range(3)] == [S - 1, 13, 22]


def test_full_context_crop_and_move(onnx_pair):
    model, path = onnx_pair
    ort_dec = OnnxDecoder(path, model.config, max_batch=2)
    seq = torch.randint(0, 1000, (model.config.max_seq_len,)).tolist()
    ort_dec.extend([0], [seq[:200]])
    grown = ort_dec.extend([0], [seq[200:]], all_logits=True)  # to the full context (max_seq)
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0, 200:]
    assert _rel_err(grown[0], ref) < 1e-4
    ort_dec.crop(0, 100)
    ort_dec.move(0, 1)
    again = ort_dec.extend([1], [seq[100:110]], all_logits=True)  # the rolled-back prefix, moved
    with torch.no_grad():
        ref = model(torch.tensor([seq[:110]]))[0, 100:]
    assert _rel_err(again[0], ref) < 1e-4


def test_graph_is_fused(make_model):
    """The decode step stays a handful of fused kernels per block (the traced export was ~120
    nodes per block of shape plumbing): GroupQueryAttention does RoPE, the cache write and
    attention; one MatMul per weight."""
    model = make_model()
    graph = build_onnx(model).graph
    ops = [n.op_type for n in graph.node]
    L = model.config.n_layer
    assert ops.count("GroupQueryAttention") == L
    assert ops.count("MatMul") == 4 * L + 1
    assert len(ops) <= 11 * L + 3


def test_unsupported_head_dim_is_refused(make_model):
    model = make_model(n_head=8, n_kv_head=2)  # head_dim 8
    with pytest.raises(ValueError, match="multiple of 16"):
        build_onnx(model)


def test_stale_export_is_refused_and_replaced(tiny_checkpoint, make_model, tmp_path):
    """A model.onnx of another graph layout (e.g. the earlier traced export) is not run."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "old", [x], [y])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    old.ir_version = 8
    stale = tiny_checkpoint / ONNX_FILE
    onnx.save(old, str(stale))  # newer than the weights, but not of this format
    with pytest.raises(ValueError, match="export it again"):
        OnnxDecoder(stale, make_model().config)
    assert ensure_onnx(tiny_checkpoint, make_model()) == stale
    assert onnx_format(stale) is not None  # re-exported in place
    OnnxDecoder(stale, make_model().config)


def test_greedy_generation_matches_torch(onnx_pair):
    model, path = onnx_pair
    pt = Engine.from_model(model)
    ort_eng = Engine(model, backend="onnx", onnx_path=path)
    kw = dict(temperature=0, stop_tokens=())
    assert ort_eng.generate(PROMPTS, 20, **kw) == pt.generate(PROMPTS, 20, **kw)
    assert ort_eng.generate(PROMPTS[1], 20, seed=3) == pt.generate(PROMPTS[1], 20, seed=3)
    ids = PROMPTS[1] + pt.generate(PROMPTS[1], 10, seed=1)
    torch.testing.assert_close(
        torch.tensor(ort_eng.score(ids)), torch.tensor(pt.score(ids)), atol=1e-4, rtol=1e-4
    )


def test_load_with_onnx_backend_and_cli(tiny_checkpoint, tmp_path):
    eng = Engine.load(tiny_checkpoint, backend="onnx")  # exports next to the checkpoint
    assert (tiny_checkpoint / "model.onnx").is_file()
    ref = Engine.load(tiny_checkpoint)
    kw = dict(temperature=0, stop_tokens=())
    assert eng.generate(PROMPTS[1], 12, **kw) == ref.generate(PROMPTS[1], 12, **kw)
    out = tmp_path / "exported.onnx"
    assert main(["export-onnx", str(tiny_checkpoint), "-o", str(out), "--check", "--int8"]) == 0
    assert out.is_file() and (tmp_path / "exported.int8.onnx").is_file()


def test_int8_is_batch_invariant_consistent_and_close_to_fp32(config_pair, tmp_path):
    """8-bit weights: not equal to fp32, but a row's logits must not depend on its batch mates
    (the scheduler's batched == one-by-one), and a prefill equals the same tokens fed one by
    one (cached == recompute)."""
    model, path = config_pair
    q = quantize_int8(path, tmp_path / INT8_FILE)
    ref = OnnxDecoder(path, model.config, max_batch=3)
    dec = OnnxDecoder(q, model.config, max_batch=3)
    prompts = [p + [700, 800, 900] for p in PROMPTS]
    full = dec.extend([0, 1, 2], prompts, all_logits=True)  # (3, T, V) padded prefill
    fp32 = ref.extend([0, 1, 2], prompts, all_logits=True)
    for r, row in enumerate(prompts):
        assert _rel_err(full[r, : len(row)], fp32[r, : len(row)]) < 0.05, f"row {r}"
    dec.reset()
    for r, row in enumerate(prompts):  # one row at a time, one token at a time
        for j, tok in enumerate(row):
            got = dec.extend([r], [[tok]])[0]
            assert _rel_err(got, full[r, j]) < 1e-4, (r, j)
    nxt = [[11], [12], [13]]
    batched = dec.extend([0, 1, 2], nxt)
    for r in range(3):
        dec.crop(r, dec.length(r) - 1)
    alone = torch.stack([dec.extend([r], [nxt[r]])[0] for r in range(3)])
    torch.testing.assert_close(batched, alone, atol=0, rtol=0)


def test_row_invariant_int8_rows_do_not_depend_on_who_shares_the_step(config_pair, tmp_path):
    """`row_invariant` (offline jobs): a row's several new tokens give the same logits alone,
    beside rows of one token, and beside other rows of several, to the bit; without it the
    path (one run, or first token batched) follows its batch mates."""
    model, path = config_pair
    dec = OnnxDecoder(quantize_int8(path, tmp_path / INT8_FILE), model.config, max_batch=4)
    dec.row_invariant = True
    new = [[31, 32, 33], [41], [51], [61]]
    results = []
    for rows in ([0], [0, 1], [0, 1, 2, 3], [0, 2]):  # row 0 with these batch mates
        # (alone: one run; among 4 with one of several tokens: its first in the batch)
        dec.reset()
        dec.extend([0, 1, 2, 3], PROMPTS + [PROMPTS[0]])
        got = dec.extend(rows, [new[r] for r in rows], all_logits=True)  # (B, T, V)
        results.append(got[0, :3])
        assert dec.length(0) == len(PROMPTS[0]) + 3
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=0, rtol=0)
    # and the next step reads the same cache
    nxt = dec.extend([0], [[70]])
    dec.reset()
    dec.extend([0], [PROMPTS[0]])
    dec.extend([0], [new[0]])
    torch.testing.assert_close(dec.extend([0], [[70]]), nxt, atol=0, rtol=0)


def test_load_with_onnx_int8_backend(tiny_checkpoint):
    eng = Engine.load(tiny_checkpoint, backend="onnx-int8")  # exports, then quantizes, beside it
    assert eng.onnx_path == tiny_checkpoint / INT8_FILE
    assert (tiny_checkpoint / ONNX_FILE).is_file()
    assert onnx_format(eng.onnx_path) is not None
    out = eng.generate(PROMPTS[1], 12, seed=1, stop_tokens=())
    assert len(out) == 12 and all(0 <= t < eng.config.vocab_size for t in out)
    assert Engine.load(tiny_checkpoint, backend="auto").backend == "onnx-int8"  # CPU default
    with pytest.raises(ValueError, match="backend"):
        Engine.load(tiny_checkpoint, backend="int4")


def test_kept_bindings_are_least_recently_used_and_give_the_same_logits(onnx_pair, monkeypatch):
    """A live server's steps bind many (first slot, rows, tokens) shapes; the kept bindings
    drop the least recently used one past the limit, and a reused binding (its buffers written
    in place) gives the logits a fresh one gives."""
    import improv.engine.onnx_backend as ob

    model, path = onnx_pair
    monkeypatch.setattr(ob, "REUSE_MAX_BINDINGS", 3)
    dec = OnnxDecoder(path, model.config, max_batch=4)
    fresh = OnnxDecoder(path, model.config, max_batch=4)
    for d in (dec, fresh):
        d.extend([0, 1, 2, 3], [[1, 3]] * 4)
    for step, slots in enumerate([[0, 1], [0, 1, 2], [0], [0, 1], [3], [0, 1, 2]]):
        toks = [[100 + step + s] for s in slots]
        a = dec.extend(slots, toks)
        fresh._io.clear()  # a binding made for this run
        b = fresh.extend(slots, toks)
        assert torch.equal(a, b), step
    # (first slot, rows, tokens), least recently used first: (0, 2, 1), used again at the 4th
    # step, outlived (0, 1, 1), dropped at the last
    assert list(dec._io) == [(0, 2, 1), (3, 1, 1), (0, 3, 1)]
