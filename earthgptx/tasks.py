"""The tasks ``Predictor.predict`` answers (``auto`` picks one from the text and the
prompts; see ``predictor.py``). Declared here, once: the command lines and the wire
protocol (``runtime/protocol.py``) take them from this module, which imports nothing."""

TASKS = ("auto", "caption", "classify", "vqa", "region", "grounding", "segment", "click")
