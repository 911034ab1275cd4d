"""`improv export-onnx CHECKPOINT -o model.onnx`: export the cached decode step to ONNX.

Top-level imports stay light (argparse only): `improv --help` must not import torch.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint folder (model.safetensors + config.json)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output file (default: CHECKPOINT/model.onnx)",
    )
    parser.add_argument(
        "--check", action="store_true", help="compare onnxruntime logits with torch after export"
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write the 8-bit-weight step beside it (model.int8.onnx: backend onnx-int8)",
    )


def _run(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .onnx_backend import ONNX_FILE, OnnxDecoder, export_onnx

    model, cfg, _, _ = load_checkpoint(args.checkpoint, "cpu")
    out = export_onnx(model, args.output or args.checkpoint / ONNX_FILE)
    if args.check:
        torch.manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (1, min(32, cfg.max_seq_len))).tolist()[0]
        got = OnnxDecoder(out, cfg).extend([0], [ids], all_logits=True)[0]
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0]
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        logger.info("max |onnx - torch| / max |torch| = %.2e", err)
        if err > 1e-4:
            logger.error("ONNX logits differ from torch by %.2e (relative)", err)
            return 1
    logger.info("wrote %s", out)
    if args.int8:
        from .onnx_backend import INT8_FILE, quantize_int8

        quantize_int8(
            out,
            out.with_name(INT8_FILE) if out.name == ONNX_FILE else out.with_suffix(".int8.onnx"),
        )
    return 0


def export_onnx_command() -> tuple[str, Callable[[argparse.ArgumentParser], None], Callable]:
    return "export a checkpoint's decode step (with KV cache inputs) to ONNX", _add_arguments, _run
