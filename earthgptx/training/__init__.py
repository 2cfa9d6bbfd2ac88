"""Training (``egx train``): instruction batches (``batches``), the training forward and its
losses (``step``), and the loop with data parallelism, checkpoints and logs (``loop``)."""
