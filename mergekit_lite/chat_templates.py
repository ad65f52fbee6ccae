"""Chat templates a plan can name (``chat_template: chatml``), and how a plan's setting is read.

mergekit's ``chat_template`` takes ``auto`` (the template most of the input models use), the name
of a built-in template, or a Jinja template written out in the plan. The built-in names are
mergekit's (so its plans run unchanged); the templates below are written for mergekit-lite from the
published prompt formats of those model families. Rendering them needs Jinja (transformers does
that when the tokenizer is used); mergekit-lite only stores them.
"""

from __future__ import annotations

BUILTIN: dict[str, str] = {
    # ChatML (OpenAI's format, used by Qwen, Hermes, ...)
    "chatml": (
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    # Llama 3 header format
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    # Mistral instruct: [INST] ... [/INST], a system message folded into the first user turn
    "mistral": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
        "{%- set turns = messages[1:] if system is not none else messages -%}"
        "{{- bos_token -}}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- ' [INST] ' ~ ((system ~ '\\n\\n') if (loop.first and system is not none) else '') ~ m['content'] ~ ' [/INST]' -}}"
        "{%- elif m['role'] == 'assistant' -%}{{- ' ' ~ m['content'] ~ eos_token -}}"
        "{%- else -%}{{- raise_exception('mistral chat template: roles are user and assistant after an optional "
        "system message') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Alpaca: ### Instruction / ### Input / ### Response sections
    "alpaca": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{- (m['content'] | trim) ~ '\\n\\n' -}}"
        "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\\n' ~ (m['content'] | trim) ~ '\\n\\n' -}}"
        "{%- elif m['role'] == 'user_context' -%}{{- '### Input:\\n' ~ (m['content'] | trim) ~ '\\n\\n' -}}"
        "{%- elif m['role'] == 'assistant' -%}{{- '### Response:\\n' ~ (m['content'] | trim) ~ '\\n\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
    ),
    # EXAONE: [|role|]content, turns closed by [|endofturn|] (user turns by a newline)
    "exaone": (
        "{%- if messages and messages[0]['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
        "{%- for m in messages -%}"
        "{{- '[|' ~ m['role'] ~ '|]' ~ m['content'] ~ ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}


def setting_problem(value: object) -> str | None:
    """Why a plan's ``chat_template`` value is not allowed, or None.

    Allowed: ``auto``, a built-in name, or a Jinja template (a string of at least 20 characters
    with a ``{``, mergekit's rule for telling a template from a name)."""
    if not isinstance(value, str) or not value.strip():
        return f"expected 'auto', a template name or a Jinja template, got {value!r}"
    if value == "auto" or value in BUILTIN:
        return None
    if len(value) >= 20 and "{" in value:
        return None
    return (f"unknown chat template {value!r}; allowed: auto (the template most input models use), "
            f"{', '.join(sorted(BUILTIN))}, or a Jinja template ({{% for message in messages %}}...)")


def resolve(value: str, candidates: list[str | None]) -> str | None:
    """The template text for a plan's setting; `candidates` are the input models' templates, in plan
    order, for ``auto`` (the most common one wins, the first seen on a tie; None when no model has one)."""
    if value == "auto":
        counts: dict[str, int] = {}
        for t in candidates:
            if t:
                counts[t.strip()] = counts.get(t.strip(), 0) + 1
        return max(counts, key=counts.get) if counts else None
    return BUILTIN.get(value, value)
