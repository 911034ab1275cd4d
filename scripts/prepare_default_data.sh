#!/bin/sh
# Build data/train and data/valid (POP909 + Groove splits) from ../shared/data for the default model.
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python -m improv.trainer.prepare --shared ../shared/data --out data "$@"
