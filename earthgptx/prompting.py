"""The text side of the model: special tokens, the chat prompt, and the splice of
image/region tokens into the text embeddings.

Sequence layout (ChatML, SmolLM2's template)::

    <|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n
    <|im_start|>user\n<sar><image>\n<region1> {text}<|im_end|>\n
    <|im_start|>assistant\n[SEG]            <- [SEG] forced for segmentation/grounding

``<image>`` stands for all ``N`` image tokens; ``<regionK>`` for region token ``K``.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
MODALITY_TOKENS = {"optical": "<optical>", "sar": "<sar>", "infrared": "<infrared>"}
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
SYSTEM_PROMPT = (
    "You are EarthGPT-X, an assistant for optical, SAR and infrared remote-sensing imagery. "
    "Boxes are written as [x0,y0,x1,y1] in 0-1 of the image padded to a square.")


def region_token(k: int) -> str:
    """The placeholder of the k-th visual prompt (1-based)."""
    return f"<region{k}>"


def special_tokens(max_regions: int) -> list[str]:
    """EarthGPT-X's added tokens, in the order their ids are assigned."""
    return [IMAGE_TOKEN, SEG_TOKEN, *MODALITY_TOKENS.values(), *(region_token(k + 1) for k in range(max_regions))]


def build_prompt(text: str, modality: str, num_regions: int, force_seg: bool) -> str:
    """The full prompt string. Regions the text does not mention are named before it."""
    missing = [region_token(k + 1) for k in range(num_regions) if region_token(k + 1) not in text]
    regions = "".join(missing) + " " if missing else ""
    user = f"{MODALITY_TOKENS[modality]}{IMAGE_TOKEN}\n{regions}{text}"
    prompt = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
              f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    return prompt + (SEG_TOKEN if force_seg else "")


def splice(ids: np.ndarray, embed_table: np.ndarray, image_tokens: np.ndarray, region_tokens: np.ndarray | None,
           image_id: int, region_ids: list[int]) -> np.ndarray:
    """Text ids ``(T,)`` -> ``inputs_embeds`` ``(T - 1 + N, hidden)`` float32.

    The single ``<image>`` id expands to ``image_tokens`` ``(N, hidden)``; the id of
    ``<regionK>`` is replaced by ``region_tokens[K - 1]`` (``(R, hidden)``).
    """
    ids = np.asarray(ids)
    embeds = embed_table[ids].astype(np.float32, copy=True)
    n_regions = 0 if region_tokens is None else len(region_tokens)
    for k, rid in enumerate(region_ids):
        where = ids == rid
        if where.any():
            if k >= n_regions:
                raise InputError(f"the text mentions {region_token(k + 1)} but only {n_regions} visual prompt(s) were given")
            embeds[where] = region_tokens[k]
    at = np.flatnonzero(ids == image_id)
    if len(at) != 1:
        raise InputError(f"the prompt must hold exactly one {IMAGE_TOKEN}, found {len(at)}: do not write it in --text")
    i = int(at[0])
    return np.concatenate([embeds[:i], image_tokens.astype(np.float32), embeds[i + 1:]], axis=0)
