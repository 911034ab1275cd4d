"""ONNX backend: exported decode step == torch (logits within 1e-4 relative, greedy equal)."""

from __future__ import annotations

import pytest
import torch

from improv.cli import main
from improv.engine.decoder import TorchDecoder
from improv.engine.engine import Engine
from improv.engine.onnx_backend import OnnxDecoder, export_onnx

pytest.importorskip("onnxruntime")

PROMPTS = [[1, 3], [1, 3, 500, 600, 10, 20, 1000], [1, 4, 300]]


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory, make_model):
    model = make_model()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, path


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_torch(onnx_pair):
    model, path = onnx_pair
    ort_dec = OnnxDecoder(path, model.config, max_batch=3)
    pt_dec = TorchDecoder(model, max_batch=3)
    for slots in ([0, 1, 2], [2, 0, 1]):  # packed slots (bound in place) and scattered (gathered)
        ort_dec.reset()
        pt_dec.reset()
        a = ort_dec.extend(slots, PROMPTS, all_logits=True)  # prefill, padded rows
        b = pt_dec.extend(slots, PROMPTS, all_logits=True)
        for r, p in enumerate(PROMPTS):
            assert _rel_err(a[r, : len(p)], b[r, : len(p)]) < 1e-4
        for t in range(5):  # decode steps, rows at different lengths
            step = [[100 + 7 * t + r] for r in range(3)]
            assert _rel_err(ort_dec.extend(slots, step), pt_dec.extend(slots, step)) < 1e-4


def test_capacity_growth_crop_and_move(onnx_pair):
    model, path = onnx_pair
    ort_dec = OnnxDecoder(path, model.config, max_batch=2)
    seq = torch.randint(0, 1000, (model.config.max_seq_len,)).tolist()
    ort_dec.extend([0], [seq[:200]])
    grown = ort_dec.extend([0], [seq[200:]], all_logits=True)  # capacity 256 -> 256+ (max_seq)
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0, 200:]
    assert _rel_err(grown[0], ref) < 1e-4
    ort_dec.crop(0, 100)
    ort_dec.move(0, 1)
    again = ort_dec.extend([1], [seq[100:110]], all_logits=True)  # the rolled-back prefix, moved
    with torch.no_grad():
        ref = model(torch.tensor([seq[:110]]))[0, 100:]
    assert _rel_err(again[0], ref) < 1e-4


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
    assert main(["export-onnx", str(tiny_checkpoint), "-o", str(out), "--check"]) == 0
    assert out.is_file()
