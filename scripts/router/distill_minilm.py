"""Distil static token embeddings from all-MiniLM-L6-v2 (offline, for the router comparison).

Each WordPiece token is run through the full encoder alone, as "[CLS] token [SEP]", and the
sentence-transformers mean pooling of that output becomes the token's static vector. A query's
vector is then an average of its tokens' vectors: no attention at request time. This is the
model2vec idea, written here in plain numpy so it needs no torch.

usage: distill_minilm.py MODEL_DIR OUT.npy
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def encode(w, cfg, ids):
    """BERT forward for a batch of equal-length id rows; returns mean-pooled outputs."""
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    b, t = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:t][None]
        + w["embeddings.token_type_embeddings.weight"][0][None, None]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    d = x.shape[-1]
    hd = d // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(name, v):
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q = lin("attention.self.query", x).reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        k = lin("attention.self.key", x).reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        v = lin("attention.self.value", x).reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = layer_norm(
            lin("attention.output.dense", a) + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = gelu(lin("intermediate.dense", x))
        x = layer_norm(
            lin("output.dense", h) + x,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    return x.mean(1)


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = {k: v.astype(np.float32) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    vocab = cfg["vocab_size"]
    cls, sep = 101, 102
    table = np.zeros((vocab, cfg["hidden_size"]), dtype=np.float32)
    step = 2048
    for start in range(0, vocab, step):
        ids = np.arange(start, min(vocab, start + step))
        batch = np.stack([np.full_like(ids, cls), ids, np.full_like(ids, sep)], 1)
        table[ids] = encode(w, cfg, batch)
        print(f"{min(vocab, start + step)}/{vocab}", file=sys.stderr)
    np.save(out, table)


if __name__ == "__main__":
    main()
