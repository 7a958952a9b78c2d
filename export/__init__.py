"""Exporters: ONNX (onnxruntime) and GGUF (llama.cpp)."""
