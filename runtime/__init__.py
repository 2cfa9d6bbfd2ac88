"""The ZeroMQ runtime: ``egx serve`` (broker, workers, a request through the chain), its
wire protocol (``docs/protocol.md``), the Python client and CURVE keys. Engines are opened
by the runners layer (``runners``)."""
