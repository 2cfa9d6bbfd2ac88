"""INT8 calibration on real multi-source imagery: build a balanced, deterministic
calibration set with prompts drawn from the annotations, and the feeds every part sees."""
