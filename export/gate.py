"""The INT8 accuracy gate: the per-request agreements of ``export.accuracy`` summarised per
modality, per dataset and per object-size bucket, and the thresholds every group must meet.

A group passes when its mask IoU and box IoU have a mean of at least ``mask_iou`` /
``box_iou`` and a 5th percentile of at least ``p5`` (a mean of 30 values hides a few bad
ones; the worst single value is reported but not gated, so that one odd image does not
decide alone), and, per modality, greedy-token agreement and answer agreement reach
``token_agreement`` and ``answer_agreement``. Every modality, every dataset within it and
every size bucket within it is a group: small objects, where INT8 hurts most, cannot hide in
a modality's mean."""
from __future__ import annotations

from dataclasses import dataclass

from .accuracy import Outcome
from .metrics import summarize


@dataclass(frozen=True)
class Gate:
    mask_iou: float = 0.98
    box_iou: float = 0.98
    p5: float = 0.95
    token_agreement: float = 0.99
    answer_agreement: float = 0.95

    def failures(self, report: dict) -> list[str]:
        """Why ``report`` (``summarize_outcomes``) fails the gate; empty when it passes."""
        out = []
        for m, r in report.items():
            groups = [(m, r)] + [(f"{m}/{d}", g) for d, g in r["per_dataset"].items()] + \
                     [(f"{m} {b} objects", g) for b, g in r["per_size"].items()]
            for name, g in groups:
                for key in ("mask_iou", "box_iou"):
                    s = g[key]
                    if s is None:
                        continue
                    if s["mean"] < getattr(self, key):
                        out.append(f"{name} {key} mean {s['mean']:.4f} < {getattr(self, key)}")
                    if s["p5"] < self.p5:
                        out.append(f"{name} {key} 5th percentile {s['p5']:.4f} < {self.p5}")
            for key in ("token_agreement", "answer_agreement"):
                if r[key] is not None and r[key] < getattr(self, key):
                    out.append(f"{m} {key} {r[key]:.4f} < {getattr(self, key)}")
        return out


def _group(outcomes: list[Outcome]) -> dict:
    answers = [o.answer_agrees for o in outcomes if o.answer_agrees is not None]
    tokens = sum(o.tokens_counted for o in outcomes)
    return {"images": len({o.item for o in outcomes}), "requests": len(outcomes),
            "mask_iou": summarize([v for o in outcomes for v in o.mask_iou]),
            "box_iou": summarize([v for o in outcomes for v in o.box_iou]),
            "token_agreement": sum(o.tokens_agree for o in outcomes) / tokens if tokens else None,
            "tokens_counted": tokens,
            "answer_agreement": sum(answers) / len(answers) if answers else None,
            "answers_counted": len(answers),
            "answers_asked": sum(1 for o in outcomes if o.task in ("region", "classify", "caption", "vqa"))}


def summarize_outcomes(outcomes: list[Outcome]) -> dict:
    """``{modality: {group stats, "per_dataset": {dataset: stats}, "per_size": {bucket: stats}}}``;
    stats: ``images``, ``requests``, ``mask_iou``/``box_iou`` as ``{n, mean, worst, p5}`` (None
    where nothing was measured), token and answer agreement with their counts."""
    report = {}
    for m in sorted({o.modality for o in outcomes}):
        mine = [o for o in outcomes if o.modality == m]
        r = _group(mine)
        r["per_dataset"] = {d: _group([o for o in mine if o.dataset == d]) for d in sorted({o.dataset for o in mine})}
        r["per_size"] = {b: _group([o for o in mine if o.bucket == b]) for b in sorted({o.bucket for o in mine})}
        report[m] = r
    return report


def print_report(report: dict, console, title: str) -> None:
    """One row per modality, dataset and size bucket: n, mean / 5th percentile / worst IoU."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("group", "images", "mask IoU mean / p5 / worst (n)", "box IoU mean / p5 / worst (n)",
                "tokens", "answers"):
        t.add_column(col, no_wrap=True)
    stat = lambda s: "-" if s is None else f"{s['mean']:.4f} / {s['p5']:.4f} / {s['worst']:.4f} ({s['n']})"  # noqa: E731
    frac = lambda v, n: "-" if v is None else f"{v:.3f} ({n})"  # noqa: E731
    for m, r in report.items():
        rows = [(m, r)] + [(f"  {m}/{d}", g) for d, g in r["per_dataset"].items()] + \
               [(f"  {m} {b}", g) for b, g in r["per_size"].items()]
        for name, g in rows:
            t.add_row(name, str(g["images"]), stat(g["mask_iou"]), stat(g["box_iou"]),
                      frac(g["token_agreement"], g["tokens_counted"]), frac(g["answer_agreement"], g["answers_counted"]))
    console.print(t, width=max(console.width, 150))
