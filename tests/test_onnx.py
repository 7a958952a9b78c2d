"""ONNX export and the onnxruntime runner, on tiny models built here (and one slow test on the real SmolLM2).

Float weights + float cache must reproduce the PyTorch MLA model (logits within 1e-3, the same 32 greedy tokens);
the graph holds one LatentAttention node per layer over a latent-width cache; quantized exports run; bad input
gets a clear error and leaves nothing behind."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from conftest import LATENT, word_tokenizer, VOCAB, converted, export, prompt, tiny_model, with_latent_norms
from edge_mla.convert import convert
from edge_mla.export import onnx as onnx_export
from edge_mla.export.onnx_graph import all_nodes
from edge_mla.export.onnx_latent_attention import DOMAIN
from edge_mla.export import onnx_weights
from edge_mla.mla import forward_with_cache
from edge_mla.runtimes.onnxruntime import META, OnnxDecoder, generate

needs_quantizer = pytest.mark.skipif(
    __import__("importlib").util.find_spec("onnx_ir") is None,
    reason="4/8-bit weights need onnxruntime.quantization's dependency onnx-ir (pip install onnx-ir)")


@torch.no_grad()
def torch_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """n argmax tokens through the model's own cache (no end-of-text stop, no logits processors)."""
    out, past, x = [], None, ids
    for _ in range(n):
        logits, past = forward_with_cache(model, x, past)
        token = int(logits[0, -1].argmax())
        out.append(token)
        x = torch.tensor([[token]])
    return out


def onnx_greedy(folder, ids: torch.Tensor, n: int) -> list[int]:
    decoder = OnnxDecoder(folder, threads=1, context=ids.shape[1] + n)
    decoder.meta["eos_token_ids"] = []  # compare all n tokens
    return generate(decoder, None, ids[0].tolist(), n)["tokens"]


@pytest.mark.parametrize("kind,body", [("llama-gqa", "gqa"), ("qwen2", "gqa"), ("llama-mha", "gqa"), ("llama-bias", "gqa"),
                                       ("llama-gqa", "matmul"), ("qwen2", "matmul"), ("llama-bias", "matmul")])
def test_float_export_equals_pytorch(tmp_path, kind, body):
    model = converted(kind)
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32, body=body)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    decoder = OnnxDecoder(folder, threads=1, context=64)
    got = decoder.forward(ids[0].numpy(), keep=ids.shape[1])
    assert np.abs(got - expected).max() < 1e-3
    # the same logits when the prompt arrives in pieces and then token by token through the cache
    decoder.reset(64)
    pieces = [decoder.forward(ids[0, :13].numpy(), keep=13)] + \
             [decoder.forward(ids[0, t:t + 1].numpy()) for t in range(13, ids.shape[1])]
    assert np.abs(np.concatenate(pieces) - expected).max() < 1e-3
    assert onnx_greedy(folder, ids, 32) == torch_greedy(model, ids, 32)


def test_latent_padded_for_the_kernel_is_exact(tmp_path):
    model = converted("llama-gqa", latent=22)  # C + R = 38: two zero channels make it 40, a multiple of 8
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    decoder = OnnxDecoder(folder, threads=1, context=64)
    assert decoder.meta["cache"]["latent_padding"] == 2 and decoder.meta["cache"]["tensors"][0]["width"] == 40
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    assert np.abs(decoder.forward(ids[0].numpy(), keep=ids.shape[1]) - expected).max() < 1e-3


@pytest.mark.parametrize("latent", [LATENT, 22])  # 22: the norm must average over C, not the padded C'
def test_learned_latent_norm_is_exact(tmp_path, latent):
    model = with_latent_norms(converted("llama-gqa", latent=latent))
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    decoder = OnnxDecoder(folder, threads=1, context=64)
    assert np.abs(decoder.forward(ids[0].numpy(), keep=ids.shape[1]) - expected).max() < 1e-3
    # onnxruntime runs every latent norm (and the first layer's input norm) as one fused kernel
    fused = optimized_op_types(folder)["SimplifiedLayerNormalization"]
    assert fused == model.config.num_hidden_layers + 1, fused
    with pytest.raises(ValueError, match="latent norm"):
        onnx_weights.decoder_from_mla(model, rotate_latent=True)


def optimized_op_types(folder) -> Counter:
    """Op types of the graph onnxruntime runs (after its fusions and function inlining)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(folder / "optimized.onnx"), load_external_data=False).graph.node)


def test_graph_has_one_latent_attention_per_layer_over_a_latent_cache(tmp_path, mla_model):
    folder = export(mla_model, tmp_path / "onnx", weight_bits=32, kv_bits=32)
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    layers = mla_model.config.num_hidden_layers
    # per layer one If: prompt chunks (then) run LatentPrefill, shorter runs (else) LatentAttention
    forms = [n for n in model.graph.node if n.op_type == "If"]
    assert len(forms) == layers
    for n in forms:
        branches = {a.name: Counter((m.domain, m.op_type) for m in a.g.node) for a in n.attribute}
        assert branches["then_branch"][(DOMAIN, "LatentPrefill")] == 1
        assert branches["then_branch"][(DOMAIN, "LatentAttention")] == 0
        assert branches["else_branch"][(DOMAIN, "LatentAttention")] == 1
    ops = Counter((n.domain, n.op_type) for n in all_nodes(model.graph))
    assert ops[("com.microsoft", "GroupQueryAttention")] == 0  # attention lives only inside the functions
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, "LatentAttention"), (DOMAIN, "LatentPrefill")]
    mla = mla_model.config.mla
    width = mla["latent_dim"] + mla["rope_dim"]
    pasts = [i for i in model.graph.input if i.name.startswith("past")]
    assert [p.name for p in pasts] == [f"past.{i}" for i in range(layers)]
    for p in pasts:
        dims = p.type.tensor_type.shape.dim
        assert dims[1].dim_value == 1 and dims[3].dim_value == width
    meta = json.loads((folder / META).read_text())
    assert meta["cache"]["bytes_per_token"] == layers * width * 4
    # onnxruntime inlines the body: the optimized graph runs GroupQueryAttention and no LatentAttention
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    optimized = Counter(n.op_type for n in all_nodes(optimized.graph))
    assert optimized["GroupQueryAttention"] == 2 * layers  # one per form
    assert optimized["LatentAttention"] == optimized["LatentPrefill"] == 0


def test_baseline_export_of_the_original_model(tmp_path):
    model = tiny_model("llama-gqa")
    folder = onnx_export.export("tiny", tmp_path / "onnx", model=model, tokenizer=word_tokenizer(), original=True,
                                weight_bits=32, kv_bits=32)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    decoder = OnnxDecoder(folder, threads=1, context=64)
    assert np.abs(decoder.forward(ids[0].numpy(), keep=ids.shape[1]) - expected).max() < 1e-3
    meta = decoder.meta
    assert meta["architecture"] == "baseline" and meta["cache"]["kind"] == "kv"
    assert meta["cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x d x fp32


@needs_quantizer
@pytest.mark.parametrize("weight_bits,kv_bits", [(4, 4), (8, 8), (16, 16), (32, 8)])
def test_quantized_exports_run_and_stay_close(tmp_path, mla_model, text_file, weight_bits, kv_bits):
    folder = export(mla_model, tmp_path / "onnx", weight_bits=weight_bits, kv_bits=kv_bits,
                    calib_text=str(text_file), calib_windows=4, calib_length=64)
    meta = json.loads((folder / META).read_text())
    width = LATENT + mla_model.config.mla["rope_dim"]
    stored = {4: (width // 2, "uint8"), 8: (width, "int8"), 16: (width, "float16"), 32: (width, "float32")}
    assert (meta["cache"]["tensors"][0]["width"], meta["cache"]["tensors"][0]["dtype"]) == stored[kv_bits]
    if kv_bits in (4, 8):
        assert len(meta["cache"]["scales"]["layers"]) == mla_model.config.num_hidden_layers
    ids = prompt()
    with torch.no_grad():
        expected = torch.log_softmax(mla_model(ids).logits[0], -1).numpy()
    decoder = OnnxDecoder(folder, threads=1, context=64)
    got = decoder.forward(ids[0].numpy(), keep=ids.shape[1])
    got = got - np.log(np.exp(got - got.max(-1, keepdims=True)).sum(-1, keepdims=True)) - got.max(-1, keepdims=True)
    # tiny random models are far from trained ones; this checks "the same model, quantized", not quality
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.8
    if weight_bits == 4:
        types = Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)
        assert types["MatMulNBits"] == 4 * mla_model.config.num_hidden_layers + 1 and types["GatherBlockQuantized"] == 1


@pytest.mark.parametrize("kv_bits", [4, 8])
def test_matmul_body_equals_gqa_body(tmp_path, mla_model, text_file, kv_bits):
    """Both LatentAttention bodies over the same quantized cache: the same codes in the buffer, the same logits
    in one prefill, in chunks and token by token."""
    common = dict(weight_bits=32, kv_bits=kv_bits, calib_text=str(text_file), calib_windows=4, calib_length=64)
    folders = {body: export(mla_model, tmp_path / body, body=body, **common) for body in ("gqa", "matmul")}
    ids = prompt()[0].numpy()
    got = {}
    for body, folder in folders.items():
        decoder = OnnxDecoder(folder, threads=1, context=64, prefill_chunk=7)
        logits = [decoder.forward(ids[:20], keep=20)] + [decoder.forward(ids[t:t + 1]) for t in range(20, len(ids))]
        got[body] = np.concatenate(logits), decoder.buffers["past.1"].numpy()[0, 0, :len(ids)]
    assert np.abs(got["matmul"][0] - got["gqa"][0]).max() < 1e-3
    same = np.mean(got["matmul"][1] == got["gqa"][1])
    assert same > 0.999, same  # the same codes in the buffer (a rounding tie may go the other way)


def test_prefill_threshold_is_where_the_expanded_form_does_less_arithmetic():
    from edge_mla.export.onnx_latent_attention import prefill_threshold

    # SmolLM2 at C + R = 224 + 32: up-projection 3 x 224 x (64 + 64) per row against 9 x 2 x (256 - 96) saved a pair
    assert prefill_threshold(heads=9, groups=3, latent=224, rope=32, nope=64, head_dim=64) == 30
    for chunk in (29, 30):  # the arithmetic of one chunk over T rows, absorbed against expanded
        absorbed = chunk * 9 * 2 * 256
        expanded = chunk * 9 * 2 * 96 + 3 * 224 * 128
        assert (expanded <= absorbed) == (chunk >= 30)
    assert prefill_threshold(heads=4, groups=2, latent=8, rope=8, nope=16, head_dim=16) > 1 << 40  # never pays


def _threshold_of(folder) -> int:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    switch = next(n for n in model.graph.node if n.op_type == "GreaterOrEqual")
    value = next(t for t in model.graph.initializer if t.name == switch.input[1])
    return int(onnx.numpy_helper.to_array(value).reshape(-1)[0])


@pytest.mark.parametrize("kv_bits", [32, 8, 4])
def test_expanded_prefill_equals_the_absorbed_form(tmp_path, mla_model, text_file, kv_bits):
    """The expanded prefill (LatentPrefill: up-projected keys and values, GroupQueryAttention over KV groups) against
    the absorbed form alone, over the same cache: the same logits in one piece, in chunks that continue a cache
    (chunk 2 runs after 25 cached rows) and token by token after it, and the same codes in the cache buffer."""
    common = dict(weight_bits=32, kv_bits=kv_bits, calib_text=str(text_file), calib_windows=4, calib_length=64)
    folders = {form: export(mla_model, tmp_path / form, prefill=form, **common) for form in ("expanded", "absorbed")}
    threshold = _threshold_of(folders["expanded"])
    ids = prompt(60)[0].numpy()
    assert threshold <= 25 < len(ids)  # the one piece and the first two chunks of 25 take the expanded form
    got = {}
    for form, folder in folders.items():
        runs = []
        for chunk in (0, 25):
            decoder = OnnxDecoder(folder, threads=1, context=72, prefill_chunk=chunk)
            logits = [decoder.forward(ids, keep=len(ids))] + [decoder.forward(ids[t:t + 1]) for t in range(40, 44)]
            runs.append((np.concatenate(logits), decoder.buffers["past.1"].numpy()[0, 0, :len(ids) + 4]))
        got[form] = runs
    tolerance = 1e-4 if kv_bits == 32 else 1e-3
    for run in range(2):
        assert np.isfinite(got["expanded"][run][0]).all()
        assert np.abs(got["expanded"][run][0] - got["absorbed"][run][0]).max() < tolerance
        same = np.mean(got["expanded"][run][1] == got["absorbed"][run][1])
        assert same > 0.999 if kv_bits < 32 else np.abs(got["expanded"][run][1] - got["absorbed"][run][1]).max() < 1e-5
    # and against PyTorch at float precision
    if kv_bits == 32:
        with torch.no_grad():
            expected = mla_model(torch.tensor(ids)[None]).logits[0].numpy()
        assert np.abs(got["expanded"][1][0][:len(ids)] - expected).max() < 1e-3


def test_expanded_prefill_is_recorded_and_budgeted(tmp_path, mla_model):
    """The export says which form reads prompts, from how many tokens, in which chunks, and what working memory a
    token of context costs while it does; the memory budget counts it (and nothing for the absorbed form)."""
    from edge_mla import budget

    prints = {}
    for form in ("expanded", "absorbed"):
        folder = export(mla_model, tmp_path / form, weight_bits=32, kv_bits=32, prefill=form)
        cache = json.loads((folder / META).read_text())["cache"]
        prints[form] = budget.footprint_onnx(folder)
        assert cache["prefill"]["form"] == form
        if form == "expanded":
            G, W = 2, LATENT + 16  # the tiny model: 2 KV groups, N + R = 16 + 16, C + R = 40
            assert cache["prefill"]["from_tokens"] == _threshold_of(folder)
            assert cache["prefill"]["work_bytes_per_token"] == 4 * (4 * G * 32 + 2 * W)
            assert cache["prefill_chunk"] == 256 == OnnxDecoder(folder, threads=1, context=8).prefill_chunk
        else:
            assert cache["prefill"]["work_bytes_per_token"] == 0 and "prefill_chunk" not in cache
    grows = {form: fp.memory_bytes(1000) - fp.memory_bytes(0) for form, fp in prints.items()}
    assert grows["expanded"] - grows["absorbed"] == 1000 * prints["expanded"].work_bytes_per_token > 0


def tied(model):
    """The tiny model with its output head tied to the embedding, as SmolLM2's is."""
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


def initializer_shapes(folder) -> list[tuple]:
    return [tuple(t.dims) for t in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer]


@pytest.mark.parametrize("body", ["gqa", "matmul"])
def test_tied_embedding_is_stored_once_and_exact(tmp_path, body):
    model = tied(converted("llama-gqa"))
    folder = export(model, tmp_path / "onnx", weight_bits=32, kv_bits=32, body=body)
    hidden = model.config.hidden_size
    shapes = initializer_shapes(folder)
    assert (hidden, VOCAB) not in shapes and (VOCAB, hidden) in shapes  # the head reads the embedding transposed
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits[0].numpy()
    got = OnnxDecoder(folder, threads=1, context=64).forward(ids[0].numpy(), keep=ids.shape[1])
    assert np.abs(got - expected).max() < 1e-3


@needs_quantizer
@pytest.mark.parametrize("head_bits", [4, 8])
def test_tied_embedding_shares_the_quantized_head_table(tmp_path, text_file, head_bits):
    model = tied(converted("llama-gqa"))
    folder = export(model, tmp_path / "onnx", weight_bits=4, kv_bits=4, head_bits=head_bits,
                    calib_text=str(text_file), calib_windows=4, calib_length=64)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("lm_head"))
    assert gather.input[0] == head.input[1]  # one packed table
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits.pop(head.name) == bits.pop(gather.name) == head_bits
    assert set(bits.values()) == {4} and len(bits) == 4 * model.config.num_hidden_layers  # the rest at 4 bits
    assert not any(n.op_type == "Gather" and n.name == "embed_tokens" for n in graph.node)
    assert not any(t.name == "embed_tokens.weight" for t in graph.initializer)
    ids = prompt()
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[0], -1).numpy()
    got = OnnxDecoder(folder, threads=1, context=64).forward(ids[0].numpy(), keep=ids.shape[1])
    got = got - got.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.8  # "the same model, quantized"


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_up_projections_are_stored_at_the_weight_bits(bits):
    """k_up / v_up through DequantizeLinear: onnxruntime gives back exactly the block-quantized weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge_mla.export import onnx_graph, onnx_matmul

    w = np.random.default_rng(0).standard_normal((3, 40, 24)).astype(np.float32)  # K = 40: a partial last block
    g = onnx_graph.Graph()
    out = onnx_matmul.up_projection(g, "w", w, onnx_graph.Options(up_bits=bits, block_size=32))
    model = helper.make_model(
        helper.make_graph(g.nodes, "t", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          g.initializers), opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    if bits == 16:
        expected = w.astype(np.float16).astype(np.float32)
    else:  # llama.cpp's q4_0 / q8_0 grid, bit for bit (what the recovery trains through; GGUF stores the same)
        from gguf import GGMLQuantizationType as QT
        from gguf.quants import dequantize, quantize

        qtype = QT.Q4_0 if bits == 4 else QT.Q8_0
        rows = np.pad(w, ((0, 0), (0, 24), (0, 0))).transpose(0, 2, 1)  # blocks of 32 along K, as rows
        expected = dequantize(quantize(np.ascontiguousarray(rows), qtype), qtype).transpose(0, 2, 1)[:, :40]
        assert np.array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    assert np.abs(got - w).max() < {4: 0.5, 8: 0.05, 16: 0.01}[bits]


@pytest.mark.slow
@needs_quantizer
def test_smollm2_int4_weights_int4_cache_perplexity_bound(tmp_path):
    """The real model, converted with the CLI defaults and exported int4/int4: held-out perplexity through
    onnxruntime stays within the bound measured in docs/onnx.md of the float PyTorch MLA model's."""
    from edge_mla.calibration import collect_stats
    from edge_mla.convert import named_plan
    from edge_mla.data import split_text, token_windows
    from edge_mla.eval import perplexity
    from edge_mla.runtimes.onnxruntime import perplexity as onnx_perplexity
    from edge_mla.source import load_source

    src = load_source("smollm2-135m")
    stats = collect_stats(src.model, token_windows(src.tokenizer, split_text("calibration"), 512, 4))
    convert(src.model, named_plan("training-free", src.model.config), stats)
    folder = onnx_export.export("smollm2-135m", tmp_path / "onnx", model=src.model, tokenizer=src.tokenizer,
                                weight_bits=4, kv_bits=4, calib_windows=4, calib_length=512)
    heldout = token_windows(src.tokenizer, split_text("heldout"), 512, 4)
    reference = perplexity(src.model, heldout)
    got = onnx_perplexity(OnnxDecoder(folder, threads=2), heldout.numpy())
    print(f"perplexity: PyTorch fp32 MLA {reference:.2f}, ONNX int4/int4 {got:.2f} (x{got / reference:.2f})")
    assert got < PPL_BOUND * reference, (reference, got)


PPL_BOUND = 3.0  # measured x2.18 on 8 x 1024 tokens (docs/onnx.md); margin for the smaller calibration here


@needs_quantizer
def test_export_without_kv_bits_takes_the_one_cache_policy(tmp_path, mla_model, text_file):
    """4-bit weights: a training-free conversion gets an int8 cache, a recovered one int4 (docs/commands.md)."""
    meta = lambda folder: json.loads((folder / META).read_text())["cache"]["dtype"]  # noqa: E731
    calib = dict(weight_bits=4, calib_text=str(text_file), calib_windows=4, calib_length=64)
    assert meta(export(mla_model, tmp_path / "free", **calib)) == "int8"
    mla_model.config.mla["recovery"] = {"steps_per_layer": 1}
    try:
        assert meta(export(mla_model, tmp_path / "recovered", **calib)) == "int4"
    finally:
        del mla_model.config.mla["recovery"]
