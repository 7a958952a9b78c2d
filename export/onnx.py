"""Export a converted model to ONNX (being written; see the open issue)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("model_dir")
    parser.add_argument("--out", required=True)


def main(args) -> int:
    raise ValueError("onnx export is not available yet in this version")
