"""Writes tiny random-weight GGUF models of the llama, qwen2 and qwen3 architectures with a
byte-level BPE ("gpt2") vocabulary, for checking wattgate's decoder against llama.cpp on the same
file (scripts/check_decoders.sh). The weights are random and the models say nothing useful; what
matters is that two implementations compute the same function.

Usage: make_tiny_decoders.py OUT_DIR   (needs the `gguf` and `numpy` packages)"""
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 128, 2, 4, 2, 256, 512
HEAD_DIM = HIDDEN // HEADS


def byte_chars():
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def vocabulary():
    tokens = byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    tokens += specials
    while len(tokens) % 32:  # a round vocabulary, as real models pad theirs
        tokens.append(f"<|pad{len(tokens)}|>")
        types.append(gguf.TokenType.UNUSED)
    return tokens, types, merges


TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write(arch, path, rng):
    w = gguf.GGUFWriter(str(path), arch)
    tokens, types, merges = vocabulary()
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def matrix(name, rows, cols, scale=0.08):
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        w.add_tensor(name, quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def vector(name, n, around=1.0, spread=0.1):
        w.add_tensor(name, (around + rng.standard_normal(n) * spread).astype(np.float32))

    matrix("token_embd.weight", len(tokens), HIDDEN, 0.5)
    for i in range(LAYERS):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", HIDDEN)
        matrix(p + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        matrix(p + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        matrix(p + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        if arch == "qwen2":
            vector(p + "attn_q.bias", HEADS * HEAD_DIM, 0.0, 0.2)
            vector(p + "attn_k.bias", KV_HEADS * HEAD_DIM, 0.0, 0.2)
            vector(p + "attn_v.bias", KV_HEADS * HEAD_DIM, 0.0, 0.2)
        if arch == "qwen3":
            vector(p + "attn_q_norm.weight", HEAD_DIM)
            vector(p + "attn_k_norm.weight", HEAD_DIM)
        matrix(p + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        vector(p + "ffn_norm.weight", HIDDEN)
        matrix(p + "ffn_gate.weight", FFN, HIDDEN)
        matrix(p + "ffn_up.weight", FFN, HIDDEN)
        matrix(p + "ffn_down.weight", HIDDEN, FFN)
    vector("output_norm.weight", HIDDEN)
    if arch != "qwen3":  # qwen3 here ties the output head to the embeddings
        matrix("output.weight", len(tokens), HIDDEN, 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)
for arch in ("llama", "qwen2", "qwen3"):
    path = out / f"tiny-{arch}.gguf"
    write(arch, path, rng)
    print(path)
