"""Exporters: the four parts of the PyTorch reference to ONNX (the embedded default,
run by ONNX Runtime), TensorRT engines and a TensorRT-LLM checkpoint. Entry point:
``python export/build_engines.py`` (also ``egx build``)."""
