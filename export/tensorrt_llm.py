"""The LLM for TensorRT-LLM: a TensorRT-LLM checkpoint (``config.json`` +
``rank0.safetensors``, its documented Llama layout), ``trtllm-build`` when installed,
sized with a prompt-embedding table for the image and region tokens.

In TensorRT-LLM, token ids >= ``vocab_size`` index rows of ``prompt_embedding_table``:
the runtime gives image and region tokens such ids and passes their embeddings as the
table (``runners/prompt_table.py``). The conversion needs only torch and safetensors, so it is
tested everywhere; building and running need TensorRT-LLM and a GPU."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch

from earthgptx.config import ModelConfig
from earthgptx.errors import EarthGPTXError


def tensorrt_llm_problem() -> str | None:
    """Why TensorRT-LLM cannot build here, or ``None``."""
    if shutil.which("trtllm-build") is None:
        return ("TensorRT-LLM is not installed (no trtllm-build on PATH): install it on the GPU machine "
                "(pip install tensorrt-llm from NVIDIA's index), or build the llm with --backend llm=onnxruntime")
    if not torch.cuda.is_available():
        return "TensorRT-LLM needs an NVIDIA GPU and none is visible"
    return None


def checkpoint_config(config: ModelConfig, vocab_size: int, dtype: str = "float16") -> dict:
    c = config.llm
    return {
        "architecture": "LlamaForCausalLM", "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "head_size": c.head_dim,
        "intermediate_size": c.intermediate, "hidden_act": "silu", "norm_epsilon": c.rms_eps,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": c.rope_theta,
        "max_position_embeddings": c.max_positions, "share_embedding_table": False,
        "use_parallel_embedding": False, "embedding_sharding_dim": 0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def convert_weights(llama, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` -> TensorRT-LLM Llama weight names (tensor parallel 1).
    q/k/v are fused in that order; TensorRT-LLM's gated MLP takes ``gate_proj`` as ``fc``
    (activated) and ``up_proj`` as ``gate``; ``down_proj`` is ``proj``."""
    sd = llama.state_dict()
    out = {"transformer.vocab_embedding.weight": sd["model.embed_tokens.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(llama.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "attention.qkv.weight"] = torch.cat(
            [sd[src + f"self_attn.{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
        out[dst + "attention.dense.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.fc.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.gate.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.proj.weight"] = sd[src + "mlp.down_proj.weight"]
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def write_checkpoint(model, folder: Path, dtype: str = "float16") -> Path:
    """Write the TensorRT-LLM checkpoint of ``model.llm`` to ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    llama = model.llm.model
    vocab = llama.config.vocab_size
    (folder / "config.json").write_text(json.dumps(checkpoint_config(model.config, vocab, dtype), indent=2))
    save_file(convert_weights(llama, getattr(torch, dtype)), folder / "rank0.safetensors")
    return folder


def build_command(checkpoint: Path, engine_dir: Path, config: ModelConfig, limits) -> list[str]:
    """The ``trtllm-build`` call: the prompt table holds every image and region token of a batch."""
    table = limits.max_batch * (config.vision.num_tokens + limits.max_prompts)
    return ["trtllm-build", "--checkpoint_dir", str(checkpoint), "--output_dir", str(engine_dir),
            "--max_batch_size", str(limits.max_batch), "--max_input_len", str(limits.max_seq),
            "--max_seq_len", str(limits.max_kv), "--max_prompt_embedding_table_size", str(table),
            "--gemm_plugin", "auto"]


def build_llm(spec, onnx_path: Path, entry: dict, opts, model, console):
    """Convert and build the LLM with TensorRT-LLM. The ONNX graph stays beside it: it
    gives the ``[SEG]`` hidden states, which TensorRT-LLM's generation does not return."""
    from runners.onnxruntime_runner import OnnxRuntimeRunner

    config = model.config
    ckpt = onnx_path.parent / "llm.trtllm-checkpoint"
    engine_dir = onnx_path.parent / "llm.trtllm-engine"
    with console.status("llm: writing the TensorRT-LLM checkpoint"):
        write_checkpoint(model, ckpt)
    cmd = build_command(ckpt, engine_dir, config, opts.limits)
    with console.status("llm: trtllm-build"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EarthGPTXError(f"trtllm-build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    if spec.external_data:
        entry["extra_files"] = [onnx_path.name + ".data"]
    entry.update({"trtllm_engine_dir": engine_dir.name, "trtllm_build": cmd,
                  "prompt_table": {"first_id": int(model.llm.model.config.vocab_size),
                                   "max_rows": opts.limits.max_batch * (config.vision.num_tokens + opts.limits.max_prompts)}})
    # parity of the chain's llm is checked on the ONNX graph the runtime uses for [SEG] states
    return OnnxRuntimeRunner("llm", onnx_path, device=opts.device), entry
