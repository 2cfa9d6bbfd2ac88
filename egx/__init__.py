"""``egx``: the one command line of EarthGPT-X. A dispatcher above every layer: it composes
the model's commands (``earthgptx.commands``), the build (``export.cli``), the ZeroMQ
server and client (``runtime.cli``) and the benchmark (``benchmarks.run``); nothing
imports it. ``python -m egx ...`` is the same as ``egx ...`` (``torchrun -m egx train``)."""
