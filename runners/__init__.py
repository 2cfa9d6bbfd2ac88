"""The runners layer: run built engines. Runners for the deployment backends (ONNX Runtime,
TensorRT, TensorRT-LLM), the build's ``manifest.json``, opening a build as the chain of the
four engines, TensorRT device tags and TensorRT-LLM prompt tables.

Above the model package (``earthgptx``), below the exporters (``export``), the ZeroMQ
server (``runtime``) and the benchmarks; it imports none of them."""
