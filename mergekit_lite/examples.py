"""Small, reproducible example checkpoints (``mergekit-lite examples``).

Five tiny Llama-architecture models in Hugging Face layout: ``base`` and fine-tunes whose task
vectors differ in the ways merge methods care about:

- ``ft_math``: a dense task vector (every entry changed a little);
- ``ft_code``: a sparse task vector (10% of entries changed, more strongly);
- ``ft_chat``: a task vector that mostly opposes ``ft_math`` in sign (−0.6·τ_math plus noise);
- ``ft_chatml``: a dense fine-tune that also added two tokens (``<|im_start|>``, ``<|im_end|>``, added
  tokens 256 and 257, with new embedding and lm_head rows) and a ChatML chat template: its
  vocabulary differs from the others', for ``tokenizer_source: union`` (``merge_configs/union.yml``).

Values come from NumPy's PCG64 generator seeded per tensor, so the files are identical on every
machine; the committed copies under ``merge_configs/models`` are checked against a regeneration in
the tests. The same helpers build the models the tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .nodes import stable_seed

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

GPT2_CONFIG: dict[str, Any] = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": 256,
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 4,
    "n_positions": 64,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

EXAMPLE_SHARD_BYTES = 400_000


def llama_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def gpt2_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, v = cfg["n_embd"], cfg["vocab_size"]
    inner = cfg.get("n_inner") or 4 * d
    shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (cfg["n_positions"], d)}
    for n in range(cfg["n_layer"]):
        p = f"transformer.h.{n}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, inner), p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    return shapes


def random_model(shapes: dict[str, tuple[int, ...]], seed: int, std: float = 0.02) -> dict[str, np.ndarray]:
    """Initial weights: N(0, std²) matrices, norms at 1 (biases at 0), each tensor seeded by its name."""
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(stable_seed("init", seed, name))
        if len(shape) == 1:
            out[name] = (np.zeros(shape) if name.endswith("bias") else np.ones(shape)).astype(np.float32)
            if not name.endswith("bias"):
                out[name] += rng.normal(0, std, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0, std, shape).astype(np.float32)
    return out


def finetune(base: dict[str, np.ndarray], kind: str, seed: int, like: dict[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """A fine-tune of `base` whose task vector is ``dense``, ``sparse`` or ``opposed`` (to `like`)."""
    out = {}
    for name, w in base.items():
        rng = np.random.default_rng(stable_seed(kind, seed, name))
        if kind == "dense":
            delta = rng.normal(0, 0.004, w.shape)
        elif kind == "sparse":
            delta = rng.normal(0, 0.012, w.shape) * (rng.random(w.shape) < 0.10)
        elif kind == "opposed":
            assert like is not None
            delta = -0.6 * (like[name] - w) + rng.normal(0, 0.002, w.shape)
        else:
            raise ValueError(kind)
        out[name] = (w + delta).astype(np.float32)
    return out


def _vocab(n: int) -> dict[str, int]:
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "merge", "model", "weights"]
    words += [f"tok{i}" for i in range(n - len(words))]
    return {w: i for i, w in enumerate(words[:n])}


def write_tokenizer(folder: str, vocab_size: int, added: tuple[str, ...] = (), chat_template: str | None = None
                    ) -> None:
    """A minimal word-level tokenizer in the `tokenizers` JSON format, with its config files; `added`
    special tokens get the ids after the vocabulary's. They are also put in the word-level vocabulary
    (as <unk>, <s> and </s> are) so that `tokenizers` keeps those ids: it numbers an added token that
    the vocabulary lacks from the vocabulary's size, and this vocabulary has a gap (the word "a" is
    listed twice, so id 3 has no token), which would shift them by one."""
    vocab = _vocab(vocab_size)
    vocab.update({t: i for i, t in enumerate(added, vocab_size)})
    specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for i, t in list(enumerate(["<unk>", "<s>", "</s>"])) + list(enumerate(added, vocab_size))]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
           "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
           "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(tok, fh, indent=1)
        fh.write("\n")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 256, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, fh, indent=2)
        fh.write("\n")


def save_model(folder: str, tensors: dict[str, Any], config: dict[str, Any] | None = None,
               max_shard_bytes: int | None = None, tokenizer: bool = True) -> str:
    """Write `tensors` as a Hugging Face folder: sharded safetensors (with an index when more than
    one shard), config.json and tokenizer files. Tensors may be numpy arrays or torch tensors."""
    os.makedirs(folder, exist_ok=True)
    ts = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
          for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ts.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in ts.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
            fh.write("\n")
    if config is not None:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")
    if tokenizer:
        write_tokenizer(folder, (config or {}).get("vocab_size", 256))
    return folder


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def example_models(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The example models' tensors."""
    base = random_model(llama_shapes(LLAMA_CONFIG), seed)
    math = finetune(base, "dense", seed + 1)
    code = finetune(base, "sparse", seed + 2)
    chat = finetune(base, "opposed", seed + 3, like=math)
    chatml = with_new_tokens(finetune(base, "dense", seed + 4), len(CHATML_TOKENS), seed + 4)
    return {"base": base, "ft_math": math, "ft_code": code, "ft_chat": chat, "ft_chatml": chatml}


def with_new_tokens(tensors: dict[str, np.ndarray], n: int, seed: int, std: float = 0.02) -> dict[str, np.ndarray]:
    """`tensors` with `n` new rows (new tokens) appended to the embedding and lm_head, N(0, std²)."""
    out = dict(tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in out:
            rng = np.random.default_rng(stable_seed("new-tokens", seed, name))
            rows = rng.normal(0, std, (n, out[name].shape[1])).astype(np.float32)
            out[name] = np.concatenate([out[name], rows])
    return out


def write_examples(target: str) -> list[str]:
    """Write the example models under `target` (replacing what is there); returns their folders."""
    out = []
    for name, tensors in example_models().items():
        folder = os.path.join(target, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        if name == "ft_chatml":
            from .chat_templates import BUILTIN

            config = {**LLAMA_CONFIG, "vocab_size": LLAMA_CONFIG["vocab_size"] + len(CHATML_TOKENS)}
            save_model(folder, tensors, config, max_shard_bytes=EXAMPLE_SHARD_BYTES, tokenizer=False)
            write_tokenizer(folder, LLAMA_CONFIG["vocab_size"], CHATML_TOKENS, BUILTIN["chatml"])
        else:
            save_model(folder, tensors, LLAMA_CONFIG, max_shard_bytes=EXAMPLE_SHARD_BYTES)
        out.append(folder)
    return out


def check_examples(target: str, write: Any = None) -> list[str]:
    """Differences between `target` and a fresh generation by `write` (default: the example models;
    empty when identical, byte for byte)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        (write or write_examples)(tmp)
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), tmp)
                mine = os.path.join(target, rel)
                if not os.path.exists(mine):
                    problems.append(f"{mine}: missing")
                    continue
                with open(os.path.join(root, f), "rb") as a, open(mine, "rb") as b:
                    if a.read() != b.read():
                        problems.append(f"{mine}: differs from a fresh generation")
    return problems
