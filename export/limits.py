"""The shape limits of a build: the ``max`` of every optimisation profile. Kept apart
from the specs so that the command line can read its defaults without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from earthgptx.config import ModelConfig


@dataclass(frozen=True)
class ShapeLimits:
    """Largest shapes an engine must take (the ``max`` of every profile)."""

    max_batch: int = 4
    max_prompts: int = 8  # visual prompts per image (<= the model's max_regions)
    max_queries: int = 8  # mask queries per image ([SEG] tokens)
    max_points: int = 16  # decoder points per query (a box is two)
    max_seq: int = 1024  # tokens per LLM call (prefill: image + text tokens)
    max_kv: int = 2048  # past + new tokens

    def check(self, config: ModelConfig) -> list[str]:
        """Problems with these limits for ``config`` (empty if none)."""
        problems = []
        for name in ("max_batch", "max_prompts", "max_queries", "max_points", "max_seq", "max_kv"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_prompts > config.prompt.max_regions:
            problems.append(f"--max-prompts {self.max_prompts} exceeds the model's {config.prompt.max_regions} "
                            "region tokens")
        if self.max_kv > config.llm.max_positions:
            problems.append(f"--max-kv {self.max_kv} exceeds the LLM's {config.llm.max_positions} positions")
        if self.max_seq > self.max_kv:
            problems.append(f"--max-seq {self.max_seq} exceeds --max-kv {self.max_kv}")
        need = config.vision.num_tokens + 64
        if self.max_seq < need:
            problems.append(f"--max-seq {self.max_seq} cannot hold a prompt: {config.vision.num_tokens} image "
                            f"tokens + text need at least {need}")
        return problems

    def axis_range(self, axis: str, config: ModelConfig) -> tuple[int, int, int]:
        """``(min, opt, max)`` of a named dynamic axis."""
        table = {
            "batch": (1, 1, self.max_batch),
            "regions": (1, 1, self.max_prompts),
            "queries": (1, 1, self.max_queries),
            "points": (1, 2, self.max_points),
            "seq": (1, config.vision.num_tokens + 64, self.max_seq),
            "past": (0, config.vision.num_tokens + 64, self.max_kv - 1),
            "total": (1, config.vision.num_tokens + 65, self.max_kv),
        }
        return table[axis]
