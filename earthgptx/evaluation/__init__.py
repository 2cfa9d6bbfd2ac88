"""Evaluation (``egx eval``): the field's metrics (``metrics``) computed over the validation
split through ``Predictor`` (``run``), for PyTorch checkpoints and built engines alike."""
