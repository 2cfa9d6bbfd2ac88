"""The benchmark (``egx bench``, ``python benchmarks/bench.py``): PyTorch and the built
engines side by side in process (``run``), and the same build through ``egx serve``
(``served``). Above the runners and the ZeroMQ runtime, which it measures; nothing but
the ``egx`` dispatcher imports it."""
