"""TensorRT and TensorRT-LLM paths: what needs no TensorRT (FP16 casting, device tags,
the TensorRT-LLM checkpoint layout and prompt table) runs everywhere; engine builds run
where TensorRT and a GPU are present and skip with the reason elsewhere."""
import json

import numpy as np
import onnx
import pytest
import torch

from earthgptx.config import preset
from export.specs import SPECS, ShapeLimits


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny):
    from export.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    model = tiny[0]
    return {part: export_onnx(SPECS[part](model.config), getattr(model, part), folder / f"{part}.onnx")
            for part in ("vision_encoder", "prompt_encoder")}


def test_fp16_cast_keeps_norms_softmax_and_act_matmuls_fp32(tiny_onnx, tmp_path):
    import onnxruntime as ort

    from export.fp16 import activation_pairs, cast_fp16

    src = tiny_onnx["vision_encoder"]
    dst = tmp_path / "v.fp16.onnx"
    report = cast_fp16(src, dst)
    assert report["kept_fp32"] > 0
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(dst)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    keep = set(activation_pairs(onnx.load(str(src))))
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    checked = 0
    for node in inferred.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax") or node.name in keep:
            assert all(types.get(i, fp32) == fp32 for i in node.input if i), (node.op_type, node.name)
            checked += 1
    assert checked >= 4
    assert any(i.data_type == fp16 for i in inferred.graph.initializer)  # the weights did go to FP16
    feed = {"pixel_values": np.random.default_rng(0).normal(size=(1, 3, 128, 128)).astype(np.float32)}
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, feed)
    for x, y in zip(a, b):
        assert y.dtype == np.float32  # FP32 at the boundary
        cos = float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y))
        assert cos > 0.999


def test_device_tag_mismatch_is_refused():
    from runners.tensorrt_device import TensorRTError, check_device_tag

    built = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    check_device_tag("vision_encoder", built, dict(built))
    with pytest.raises(TensorRTError, match="rebuild on this device") as err:
        check_device_tag("vision_encoder", built, {**built, "tensorrt": "11.4.1"})
    assert "vision_encoder" in str(err.value) and "10.3.0" in str(err.value)
    with pytest.raises(TensorRTError, match="compute_capability"):
        check_device_tag("llm", built, {**built, "compute_capability": "9.0"})


def test_tensorrt_llm_checkpoint_layout_and_values(tiny, tmp_path):
    from safetensors.torch import load_file

    from export.tensorrt_llm import write_checkpoint

    model = tiny[0]
    folder = write_checkpoint(model, tmp_path / "ckpt", dtype="float32")
    cfg = json.loads((folder / "config.json").read_text())
    c = model.config.llm
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_hidden_layers"] == c.layers
    assert cfg["num_key_value_heads"] == c.kv_heads and cfg["head_size"] == c.head_dim
    assert cfg["vocab_size"] == model.llm.embed_table.shape[0]
    w = load_file(folder / "rank0.safetensors")
    sd = model.llm.model.state_dict()
    assert len(w) == 3 + 7 * c.layers
    qkv = w["transformer.layers.1.attention.qkv.weight"]
    assert qkv.shape == (c.hidden + 2 * c.kv_heads * c.head_dim, c.hidden)
    q, k, v = torch.split(qkv, [c.hidden, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim])
    assert torch.equal(q, sd["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(v, sd["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(w["transformer.layers.0.mlp.fc.weight"], sd["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(w["transformer.layers.0.mlp.gate.weight"], sd["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(w["transformer.layers.0.mlp.proj.weight"], sd["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(w["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied in SmolLM2


def test_prompt_table_reproduces_the_splice(tiny_predictor):
    from earthgptx.prompting import splice
    from runners.prompt_table import prompt_table, prompt_table_ids

    p = tiny_predictor
    vocab = p.embed_table.shape[0]
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, p.embed_table.shape[1])).astype(np.float32)
    regions = rng.normal(size=(2, p.embed_table.shape[1])).astype(np.float32)
    ids = np.array([11, p.image_id, 12, p.region_ids[1], 13, p.region_ids[0]])
    table = prompt_table(image, regions, p.config.prompt.max_regions)
    expanded = prompt_table_ids(ids, p.image_id, len(image), p.region_ids, vocab)
    full = np.concatenate([p.embed_table, table])
    np.testing.assert_array_equal(full[expanded], splice(ids, p.embed_table, image, regions, p.image_id, p.region_ids))


def test_trtllm_build_command_sizes_the_prompt_table(tmp_path):
    from export.tensorrt_llm import build_command

    cfg = preset("edge")
    cmd = build_command(tmp_path / "c", tmp_path / "e", cfg, ShapeLimits(max_batch=2, max_prompts=8))
    assert cmd[0] == "trtllm-build"
    assert cmd[cmd.index("--max_prompt_embedding_table_size") + 1] == str(2 * (256 + 8))


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engines_match_pytorch(tmp_path, data_root):
    """On a machine with TensorRT and a GPU: FP32 and FP16 engines of the tiny model pass parity."""
    from export.build import BuildOptions, per_part, run_build
    from runners.manifest import PRECISIONS

    for precision in ("fp32", "fp16"):
        opts = BuildOptions(preset="tiny", out=tmp_path / precision, data_root=data_root, device="cuda",
                            backends=per_part(["tensorrt"], ("onnxruntime", "tensorrt", "tensorrt-llm"), "onnxruntime", "backend"),
                            precisions=per_part([precision], PRECISIONS, "fp32", "precision"))
        reports = run_build(opts)
        assert all(r.parity["passed"] for r in reports)


def test_prompt_table_generator_gives_the_chain_answer(tiny, data_root):
    """The TensorRT-LLM path of the chain (text from an engine fed a prompt table, [SEG]
    states from one pass of the llm graph) against the chain's own KV-cache loop, with a
    stand-in engine that decodes greedily from the same table on the PyTorch LLM."""
    from earthgptx.generation import GenerationConfig, generate
    from earthgptx.imageio import read_image
    from earthgptx.predictor import Predictor
    from earthgptx.processing import VisualPrompts
    from runners.tensorrt_llm_runner import PromptTableTextGenerator

    model, tok = tiny
    reference = Predictor.from_model(model, tok)

    class StandIn:  # what TensorRT-LLM does with a prompt table, done on the PyTorch LLM
        def generate(self, table_ids, table, cfg, end_ids):
            embeds = np.concatenate([reference.embed_table, table])[table_ids]
            g = generate(reference.runners["llm"], embeds[None], reference.embed_table, model.config.llm, cfg,
                         set(end_ids), -1, lambda ids: "")
            return g.token_ids

    chained = Predictor(reference.runners, tok, model.config, reference.embed_table,
                        text_generator=PromptTableTextGenerator(StandIn()))
    img = read_image(data_root / "sar/hrsid/P0094_0_800_3000_3800.png").data
    gen = GenerationConfig(max_new_tokens=5)
    for text, prompts in [("Segment <region1>.", VisualPrompts([(400, 400)], [], [])),
                          ("What is in <region1>?", VisualPrompts([], [(100, 100, 300, 300)], []))]:
        a = reference.predict(img, "sar", text, prompts, generation=gen)
        b = chained.predict(img, "sar", text, prompts, generation=gen)
        assert a.token_ids == b.token_ids and a.text == b.text and len(a.masks) == len(b.masks)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
        for ma, mb in zip(a.masks, b.masks):
            union = (ma | mb).sum()
            assert union == 0 or (ma & mb).sum() / union >= 0.99
