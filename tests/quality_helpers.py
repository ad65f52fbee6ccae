"""A transformers checkpoint whose greedy output is known by construction, for eval and search tests.

The *successor model* is a one-layer Llama whose attention and MLP write nothing (``o_proj`` and
``down_proj`` are zero): the last hidden state is the RMS-normalised one-hot embedding of the last
token, and ``lm_head`` maps token t to one next token NEXT[t] with logit gap ``s`` (every other
logit is 0). So the continuation of a prompt is the chain NEXT[last], NEXT[NEXT[last]], …, and
the probability of every token is known: p(NEXT[t] | t) = eˢ/(eˢ + V − 1).
"""

from __future__ import annotations

import math

import numpy as np

from mergekit_lite.demo import CONFIG, SPECIALS, write_tokenizer
from mergekit_lite.examples import save_model

CHARS = "abqxyz=:\n "
VOCAB = {**{t: i for i, t in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(CHARS)}}
HIDDEN = 16
NORM = 3.0  # final norm weight: the logit gap is NORM / rms(one-hot)
# '=' -> 'x' -> 'y' -> </s>;  ':' -> 'z' -> '\n' -> 'a';  'a' -> 'a' (never stops); anything else -> </s>
NEXT = {"=": "x", "x": "y", "y": "</s>", ":": "z", "z": "\n", "\n": "a", "a": "a"}
SUCCESSOR_CONFIG = {**CONFIG, "vocab_size": len(VOCAB), "hidden_size": HIDDEN, "intermediate_size": 16,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                    "max_position_embeddings": 32}


def next_id(token: str, mapping: dict[str, str] = NEXT) -> int:
    return VOCAB[mapping.get(token, "</s>")]


def successor_tensors(scale: float = NORM, seed: int = 0, mapping: dict[str, str] = NEXT) -> dict[str, np.ndarray]:
    """The successor model of `mapping` (token -> the token that follows it)."""
    rng = np.random.default_rng(seed)
    v, h = len(VOCAB), HIDDEN
    embed = np.eye(v, h, dtype=np.float32)
    head = np.zeros((v, h), dtype=np.float32)
    for token, t in VOCAB.items():
        head[next_id(token, mapping), t] = 1.0
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": embed,
        p + "input_layernorm.weight": np.ones(h, np.float32),
        p + "self_attn.q_proj.weight": rng.normal(0, 0.1, (h, h)).astype(np.float32),
        p + "self_attn.k_proj.weight": rng.normal(0, 0.1, (h, h)).astype(np.float32),
        p + "self_attn.v_proj.weight": rng.normal(0, 0.1, (h, h)).astype(np.float32),
        p + "self_attn.o_proj.weight": np.zeros((h, h), np.float32),
        p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        p + "mlp.gate_proj.weight": rng.normal(0, 0.1, (16, h)).astype(np.float32),
        p + "mlp.up_proj.weight": rng.normal(0, 0.1, (16, h)).astype(np.float32),
        p + "mlp.down_proj.weight": np.zeros((h, 16), np.float32),
        "model.norm.weight": np.full(h, scale, np.float32),
        "lm_head.weight": head,
    }


def save_successor(folder: str, scale: float = NORM, mapping: dict[str, str] = NEXT) -> str:
    save_model(folder, successor_tensors(scale, mapping=mapping), SUCCESSOR_CONFIG, tokenizer=False)
    write_tokenizer(folder, VOCAB)
    return folder


def logit_gap(scale: float = NORM) -> float:
    """s = scale / sqrt(mean(e_t²) + eps) for a one-hot e_t in HIDDEN dimensions."""
    return scale / math.sqrt(1.0 / HIDDEN + CONFIG["rms_norm_eps"])


def token_nll(predicted: bool, scale: float = NORM) -> float:
    """−log p of a token that is (or is not) the successor of the one before it."""
    s = logit_gap(scale)
    z = math.exp(s) + len(VOCAB) - 1
    return math.log(z) - (s if predicted else 0.0)
