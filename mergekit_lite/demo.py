"""The demo: tiny Llama models trained for real on synthetic tasks, to measure what merges keep.

``mergekit-lite demo-train OUT`` trains, on the CPU in a few minutes (one thread):

- ``base``: a generic skill mix (copy a string, count its characters, shift every character by
  one) plus small instances of the three tasks (strings of at most 4 letters, sums of a number
  below 20 and a digit), so that it has part of each skill, as a pretrained model does;
- three fine-tunes of it, each on one task at full size: ``reverse`` (``rev:abcdef=`` →
  ``fedcba``), ``sort`` (``srt:fcab=`` → ``abcf``) and ``add`` (``add:73+8=`` → ``81``), strings
  of 3 to 6 letters and sums of a number below 100 and a digit;

and writes them as Hugging Face folders (transformers' ``LlamaForCausalLM``, about 220 K
parameters, a character-level tokenizer), plus validation and test splits of each task as JSONL
``prompt``/``answer`` files for ``mergekit-lite eval`` and ``search``. Everything is seeded: the
splits are identical everywhere, and the weights on the same machine and library versions.
Training examples are drawn fresh at every step and never include a validation or test prompt.
The copies shipped in ``merge_configs/demo/`` were made by this command with its defaults.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHARS = LETTERS + "qrstuvwxyz" + DIGITS + ":=+"
UNK, BOS, EOS, PAD = range(4)
VOCAB = {**{t: i for i, t in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(CHARS)}}

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(VOCAB),
    "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
    "initializer_range": 0.02, "torch_dtype": "float32",
}


# -- tasks ---------------------------------------------------------------------------------------

Example = tuple[str, str]  # (prompt, answer)


def _word(rng: random.Random, alphabet: str = LETTERS, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def task_reverse(rng: random.Random, longest: int = 6) -> Example:
    w = _word(rng, hi=longest)
    return f"rev:{w}=", w[::-1]


def task_sort(rng: random.Random, longest: int = 6) -> Example:
    w = _word(rng, hi=longest)
    return f"srt:{w}=", "".join(sorted(w))


def task_add(rng: random.Random, largest: int = 99) -> Example:
    a, b = rng.randint(0, largest), rng.randint(0, 9)
    return f"add:{a}+{b}=", str(a + b)


def task_copy(rng: random.Random) -> Example:
    w = _word(rng, LETTERS + DIGITS, 1, 8)
    return f"cpy:{w}=", w


def task_count(rng: random.Random) -> Example:
    w = _word(rng, LETTERS + DIGITS, 1, 9)
    return f"len:{w}=", str(len(w))


def task_shift(rng: random.Random) -> Example:
    w = _word(rng, LETTERS[:-1] + DIGITS[:-1], 1, 8)
    return f"nxt:{w}=", "".join(CHARS[CHARS.index(c) + 1] for c in w)


TASKS: dict[str, Callable[[random.Random], Example]] = {"reverse": task_reverse, "sort": task_sort, "add": task_add}
# the base's mix: generic skills, and the three tasks on small instances only (strings of at most 4
# letters, sums of a number below 20 and a digit), so that the base has part of each skill and each
# fine-tune learns the rest
GENERIC: dict[str, Callable[[random.Random], Example]] = {
    "copy": task_copy, "count": task_count, "shift": task_shift,
    "reverse-short": lambda rng: task_reverse(rng, longest=4), "sort-short": lambda rng: task_sort(rng, longest=4),
    "add-small": lambda rng: task_add(rng, largest=19)}


def splits(task: str, n_val: int = 200, n_test: int = 300, seed: int = 0) -> dict[str, list[Example]]:
    """Validation and test examples of `task`: distinct prompts, seeded."""
    rng = random.Random(f"{seed}-{task}-splits")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n_val + n_test:
        prompt, answer = TASKS[task](rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    return {"val": out[:n_val], "test": out[n_val:]}


# -- training ------------------------------------------------------------------------------------

@dataclass
class Schedule:
    steps: int
    lr: float
    batch: int = 32
    warmup: int = 50


BASE_SCHEDULE = Schedule(steps=2000, lr=3e-3)
# each fine-tune trains until it masters its task (addition needs twice as long as the others)
FINETUNE_SCHEDULES = {"reverse": Schedule(steps=400, lr=1e-3), "sort": Schedule(steps=400, lr=1e-3),
                      "add": Schedule(steps=800, lr=1e-3)}


def encode(text: str) -> list[int]:
    return [VOCAB.get(c, UNK) for c in text]


def batch_tensors(examples: list[Example]):
    """Input ids ``<s> prompt answer </s>`` padded on the right, and labels that score only the
    answer and ``</s>`` (-100 elsewhere)."""
    import torch

    rows = [([BOS] + encode(p), encode(a) + [EOS]) for p, a in examples]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def train(model, draw: Callable[[random.Random], Example], schedule: Schedule, seed: int, exclude: set[str],
          log: Callable[[str], None]) -> None:
    """AdamW with linear warmup and cosine decay to 10%; fresh examples every step."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(f"train-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(schedule.steps):
        batch = []
        while len(batch) < schedule.batch:
            ex = draw(rng)
            if ex[0] not in exclude:
                batch.append(ex)
        ids, labels = batch_tensors(batch)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == schedule.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}")
    model.eval()


def mixture(tasks: dict[str, Callable[[random.Random], Example]]) -> Callable[[random.Random], Example]:
    names = sorted(tasks)
    return lambda rng: tasks[rng.choice(names)](rng)


# -- writing -------------------------------------------------------------------------------------

def write_tokenizer(folder: str, vocab: dict[str, int] | None = None) -> None:
    """A character-level tokenizer (``tokenizers`` JSON): one token per character, ``<s>`` first;
    `vocab` (default :data:`VOCAB`) starts with the four special tokens."""
    vocab = vocab or VOCAB
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(SPECIALS)]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
           "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}},
           "decoder": {"type": "Fuse"}, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": CONFIG["max_position_embeddings"],
           "clean_up_tokenization_spaces": False}
    for name, data in (("tokenizer.json", tok), ("tokenizer_config.json", cfg)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")


def save(model, folder: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(CONFIG, fh, indent=2)
        fh.write("\n")
    write_tokenizer(folder)


def write_splits(folder: str, seed: int) -> set[str]:
    """``tasks/<task>.val.jsonl`` and ``.test.jsonl``; returns every prompt written (kept out of training)."""
    os.makedirs(os.path.join(folder, "tasks"), exist_ok=True)
    held_out = set()
    for task in TASKS:
        for split, examples in splits(task, seed=seed).items():
            with open(os.path.join(folder, "tasks", f"{task}.{split}.jsonl"), "w", encoding="utf-8") as fh:
                for prompt, answer in examples:
                    fh.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
                    held_out.add(prompt)
    return held_out


def train_demo(out: str, *, seed: int = 0, base: Schedule = BASE_SCHEDULE,
               finetune: dict[str, Schedule] | None = None, threads: int = 1,
               log: Callable[[str], None] = print) -> dict[str, str]:
    """Train the base and the three fine-tunes into `out` (``models/<name>``) and write the task
    splits (``tasks/``); returns the model folders. `finetune` defaults to :data:`FINETUNE_SCHEDULES`."""
    finetune = finetune or FINETUNE_SCHEDULES
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    held_out = write_splits(out, seed)
    torch.manual_seed(seed)
    config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")})
    model = LlamaForCausalLM(config)
    start = time.time()
    log(f"base: {sum(p.numel() for p in model.parameters())} parameters, generic mix {sorted(GENERIC)}")
    train(model, mixture(GENERIC), base, seed, held_out, log)
    folders = {"base": os.path.join(out, "models", "base")}
    save(model, folders["base"])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(TASKS):
        log(f"{task}: fine-tuning the base")
        model.load_state_dict(initial)
        train(model, TASKS[task], finetune[task], seed + 1 + i, held_out, log)
        folders[task] = os.path.join(out, "models", task)
        save(model, folders[task])
    log(f"trained in {time.time() - start:.0f}s")
    return folders
