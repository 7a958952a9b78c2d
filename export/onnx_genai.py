"""onnxruntime-genai files for an ONNX export: genai.onnx (the same graph and weights, with genai's I/O names and
cache protocol) and genai_config.json, written next to model.onnx in the export folder.

onnxruntime-genai (the core of its Android/iOS packages) binds, per layer, one key and one value buffer of the same
shape [batch, kv_heads, max_length, head_size] to past_key_values.N.key/value and present.N.key/value (one buffer
for past and present: `past_present_share_buffer`), feeds attention_mask [batch, total] and expects logits for every
new position. It has no cache with a single tensor per layer, so the MLA graph keeps the latent row [c | k_rope]
in both buffers: LatentAttention becomes LatentAttentionKV, the same GroupQueryAttention body with the row fed as
key and value into their own caches (GQA needs value rows as wide as key rows, and updates in place only when
past and present key and value are each one buffer). Each layer's If keeps the expanded prefill of a gqa-body
export: LatentPrefill writes genai's key buffer and its branch copies the rows into the value buffer; a matmul-body
export's genai.onnx inlines the absorbed form alone. The genai cache is therefore twice edge-mla's own runner's
(`bytes_per_token` in the config's "edge_mla" section), still a fraction of the original model's K and V at
the same cache type. genai.onnx shares model.onnx.data: it adds ~0.2 MB to the folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from edge_mla.export.onnx_graph import all_nodes
from edge_mla.export.onnx_latent_attention import MS, latent_attention_gqa
from edge_mla.runtimes.onnxruntime import META, read_meta

MODEL = "genai.onnx"
CONFIG = "genai_config.json"
PAST = "past_key_values.%d.{}"
PRESENT = "present.%d.{}"
KV_FUNCTION = "LatentAttentionKV"


def _kv_function(function: onnx.FunctionProto, at: int) -> onnx.FunctionProto:
    """LatentAttention(..., past (input `at`), ...) -> (output, present, present_alias) rewritten to take and return
    a separate key and value cache: the GroupQueryAttention in its body reads past_key and past_value (its inputs 3
    and 4) and writes present_key and present_value from their own buffers."""
    past, presents = function.input[at], list(function.output[1:])
    if len(presents) != 2 or not any(n.op_type == "GroupQueryAttention" for n in function.node):
        raise ValueError("onnxruntime-genai needs the in-place cache of the gqa attention body")
    kv = copy.deepcopy(function)
    kv.name = KV_FUNCTION
    inputs = list(function.input)
    kv.input[:] = inputs[:at] + ["past_key", "past_value"] + inputs[at + 1:]
    renamed = dict(zip(presents, ["present_key", "present_value"]))
    kv.output[:] = [function.output[0], "present_key", "present_value"]
    for node in kv.node:
        node.input[:] = ["past_value" if n == past and node.op_type == "GroupQueryAttention" and j == 4 else
                         "past_key" if n == past else n for j, n in enumerate(node.input)]
        node.output[:] = [renamed.get(n, n) for n in node.output]
    kv.doc_string = ("LatentAttention with the latent cache in two buffers (onnxruntime-genai's key and value "
                     "caches): GroupQueryAttention's past_key and past_value each hold the [c | k_rope] rows.")
    return kv


GROUP_SCALE = "_group_scale."  # in the names of the scale buffers of a `--kv-scales row|q4_0` export


def _drop_group_scales(graph: onnx.GraphProto) -> None:
    """A graph with scales kept per row (`--kv-scales row|q4_0`) without them (the LatentAttention node's last input
    and output, and their graph I/O), its attention marked static per channel: genai's GroupQueryAttention keeps the
    rows on the static per-channel scales alone (the export fits them too), at their quality (docs/onnx.md)."""
    for values in (graph.input, graph.output):
        for value in [v for v in values if GROUP_SCALE in v.name]:
            values.remove(value)
    for node in graph.node:
        if node.op_type == "LatentAttention" and any(GROUP_SCALE in n for n in node.input):
            node.input[:] = [n for n in node.input if GROUP_SCALE not in n]
            node.output[:] = [n for n in node.output if GROUP_SCALE not in n]
            next(a for a in node.attribute if a.name == "kv_quant").s = b"PER_CHANNEL"


def _absorbed_only(model: onnx.ModelProto) -> None:
    """Each layer's If (expanded prefill form / absorbed form) replaced by its absorbed branch, inlined: for a
    matmul-body export, whose absorbed branch writes one present where genai keeps two buffers."""
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type != "If":
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == "else_branch")
        rename = {o.name: name for o, name in zip(branch.output, node.output)}
        for inner in branch.node:
            inner.output[:] = [rename.get(n, n) for n in inner.output]
            inner.input[:] = [rename.get(n, n) for n in inner.input]
            nodes.append(inner)
        graph.value_info.extend(v for v in branch.value_info if v.name not in rename)
    graph.ClearField("node")
    graph.node.extend(nodes)
    for function in [f for f in model.functions if f.name == "LatentPrefill"]:
        model.functions.remove(function)


def genai_graph(model: onnx.ModelProto, meta: dict) -> onnx.ModelProto:
    """The export's graph with genai's names: the cache I/O per layer as key/value pairs, logits for every new
    position (the logits_to_keep input becomes the new token count)."""
    model = copy.deepcopy(model)
    graph = model.graph
    mla = meta["architecture"] == "mla"
    if mla and meta["cache"].get("attention_body") != "gqa":
        _absorbed_only(model)
    _drop_group_scales(graph)
    rename: dict[str, str] = {}
    value_of: dict[str, str] = {}  # MLA: the past input -> the name of its twin, genai's value cache
    for i, tensors in enumerate(_per_layer(meta)):
        if mla:
            t = tensors[0]
            rename[t["past"]] = PAST.format("key") % i
            value_of[t["past"]] = PAST.format("value") % i
            rename.update(zip(t["present"], [PRESENT.format("key") % i, PRESENT.format("value") % i]))
        else:
            for part, t in zip(("key", "value"), tensors):
                rename[t["past"]] = PAST.format(part) % i
                rename[t["present"][0]] = PRESENT.format(part) % i

    for value in list(graph.input):
        if value.name in value_of:
            twin = copy.deepcopy(value)
            twin.name = value_of[value.name]
            graph.input.append(twin)
        value.name = rename.get(value.name, value.name)
    for value in graph.output:
        value.name = rename.get(value.name, value.name)
    at = None
    # the layers' nodes, and those of each layer's If branches (the expanded prefill's LatentPrefill reads and
    # writes genai's key buffer; its branch copies the rows into the value buffer, which holds the same rows)
    for node in all_nodes(graph):
        inputs = list(node.input)
        if node.op_type == "LatentAttention":  # past -> (past key, past value), the KV function's signature
            at = next(j for j, n in enumerate(inputs) if n in value_of)
            inputs[at:at + 1] = [inputs[at], value_of[inputs[at]]]
            node.op_type = KV_FUNCTION
            if len(node.output) == 2:  # the matmul body writes one present; genai's value cache is the second
                i = list(value_of).index(inputs[at])
                node.output.append(PRESENT.format("value") % i)
                key = next(v for v in graph.output if v.name == rename[node.output[1]])
                graph.output.append(copy.deepcopy(key))
                graph.output[-1].name = node.output[2]
        node.input[:] = [rename.get(n, n) for n in inputs]
        node.output[:] = [rename.get(n, n) for n in node.output]
    if mla:  # genai drives GroupQueryAttention's two caches: the gqa body, whichever body model.onnx carries
        function = next(f for f in model.functions if f.name == "LatentAttention")
        gqa = function if any(n.op_type == "GroupQueryAttention" for n in function.node) else latent_attention_gqa()
        model.functions.append(_kv_function(gqa, at))
        model.functions.remove(function)
        if not any(o.domain == MS for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS, 1))

    # logits for every new position, as genai allocates them: logits_to_keep = the new token count
    keep = next(v for v in graph.input if v.name == "logits_to_keep")
    graph.input.remove(keep)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.int64), "genai/one"))
    graph.node.insert(0, helper.make_node("Shape", ["input_ids"], ["genai/ids_shape"], name="genai/ids_shape"))
    graph.node.insert(1, helper.make_node("Gather", ["genai/ids_shape", "genai/one"], ["logits_to_keep"], axis=0,
                                          name="genai/logits_to_keep"))
    return model


def _per_layer(meta: dict) -> list[list[dict]]:
    """The cache tensors of every layer: [latent] for MLA, [key, value] for the baseline."""
    tensors = [t for t in meta["cache"]["tensors"] if GROUP_SCALE not in t["past"]]
    if meta["architecture"] == "mla":
        if meta["cache"]["mode"] != "inplace":
            raise ValueError("onnxruntime-genai needs the in-place cache of the gqa attention body; re-export with "
                             "`edge-mla export onnx --attention gqa`")
        return [[t] for t in tensors]
    return [tensors[i:i + 2] for i in range(0, len(tensors), 2)]


def _token_id(folder: Path, name: str | None) -> int | None:
    if not name:
        return None
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    return ids.get(name, tokenizer.get("model", {}).get("vocab", {}).get(name))


def genai_config(folder: Path, meta: dict, model: onnx.ModelProto) -> dict:
    layers = _per_layer(meta)
    first = layers[0][0]
    # a float table gives the hidden size; a quantized one (or the output head's shared table) leaves it 0
    embed = next((i for i in model.graph.initializer if i.name.startswith("embed_tokens")), None)
    heads = next(a.i for n in all_nodes(model.graph) if n.op_type in ("LatentAttention", "GroupQueryAttention")
                 for a in n.attribute if a.name == "num_heads")
    tok_config = folder / "tokenizer_config.json"
    special = json.loads(tok_config.read_text()) if tok_config.exists() else {}
    eos = meta["eos_token_ids"]
    bos = _token_id(folder, special.get("bos_token") if isinstance(special.get("bos_token"), str) else None)
    return {
        "model": {
            "bos_token_id": bos if bos is not None else eos[0],
            "context_length": meta["max_context"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL,
                "head_size": first["width"],
                "hidden_size": int(embed.dims[-1]) if embed is not None and embed.data_type == onnx.TensorProto.FLOAT
                else 0,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": PAST.format("key"), "past_value_names": PAST.format("value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT.format("key"),
                            "present_value_names": PRESENT.format("value")},
                "num_attention_heads": int(heads),
                "num_hidden_layers": len(layers),
                "num_key_value_heads": first["heads"],
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "type": "llama",
            "vocab_size": meta["vocab_size"],
        },
        "search": {"do_sample": False, "max_length": meta["max_context"], "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def genai_meta(meta: dict) -> dict:
    """What the genai files hold, for edge_mla_onnx.json (genai refuses unknown keys in its own config)."""
    mla = meta["architecture"] == "mla"
    rows = sum(t["heads"] * t["width"] * np.dtype(t["dtype"]).itemsize for layer in _per_layer(meta) for t in layer)
    return {"model": MODEL, "config": CONFIG, "cache_bytes_per_token": rows * (2 if mla else 1),
            "cache_layout": "the latent row [c | k_rope] kept in both genai's key and value cache (in place)" if mla
                            else "the original model's K and V caches"}


def add_genai(folder: str | Path) -> Path:
    """Write genai.onnx and genai_config.json into an export folder (they reuse model.onnx.data) and record them
    in edge_mla_onnx.json. Each file is written under a temporary name and renamed."""
    folder = Path(folder)
    meta = read_meta(folder)
    model = onnx.load(str(folder / meta["model"]), load_external_data=False)
    genai = genai_graph(model, meta)
    config = genai_config(folder, meta, model)
    meta["genai"] = genai_meta(meta)
    files = {MODEL: lambda p: onnx.save_model(genai, str(p)),
             CONFIG: lambda p: p.write_text(json.dumps(config, indent=1)),
             META: lambda p: p.write_text(json.dumps(meta, indent=1))}
    staged = [(folder / (name + ".tmp"), folder / name) for name in files]
    try:
        for (tmp, _), write in zip(staged, files.values()):
            write(tmp)
        for tmp, final in staged:
            tmp.replace(final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return folder / MODEL

