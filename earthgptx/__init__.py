"""EarthGPT-X: a multimodal LLM for optical, SAR and infrared remote sensing, as a
PyTorch reference cut into four deployable parts: ``vision_encoder``,
``prompt_encoder``, ``llm`` and ``pixel_decoder``."""

__version__ = "0.1.0"
