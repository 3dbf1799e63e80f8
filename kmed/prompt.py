"""The one definition of how the model is prompted: training rendering, chat template, decoding defaults.

Preprocess renders training records with `render_prompt` / `render_completion`; merge writes
`chat_template()` into every merged folder (and so into every GGUF) together with the decoding defaults
in `generation_config.json`; evaluate, export and `kmed.serve` prompt the model the same way. A test
renders `render_prompt` and the chat template for the same messages and compares them byte for byte
and token for token, so the two cannot drift.

`data.prompt_format` picks the training prompt:
- `seed` (default): the seed notebook's R1 prompt, `### Instruction:` / `### Question:` / `### Response:`;
  the exported chat template is that prompt written in Jinja (below).
- `chat_template`: the base model's own chat template (what TRL and Axolotl do); it is exported unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# DeepSeek-R1's published decoding (its generation_config.json and model card: greedy decoding loops).
# top_k 0 = no top-k cut (R1 names none; transformers would otherwise apply 50, llama.cpp 40).
R1_DECODING: dict[str, Any] = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0}


def render_prompt(system: str, question: str) -> str:
    """The masked part of a training example in the seed format (no loss on it; no BOS: tokenizing
    with add_special_tokens=True adds the tokenizer's own)."""
    return f"### Instruction:\n{system}\n\n### Question:\n{question}\n\n### Response:\n"


def render_completion(cot: str | None, answer: str, eos: str) -> str:
    """The trained part: R1-style `<think>` block (when cot is not None), the answer and the EOS."""
    return f"<think>\n{cot}\n</think>\n{answer}{eos}" if cot is not None else f"{answer}{eos}"


def seed_chat_template(system: str, with_bos: bool) -> str:
    """`render_prompt` as a Jinja chat template (HF `apply_chat_template`, llama.cpp, vLLM, TGI).

    A system message replaces the default system text (the params' `data.system_prompt`, baked in).
    Earlier assistant turns keep only their answer: R1's rule, the `<think>` block is dropped from the
    history. `with_bos`: the tokenizer adds a BOS of its own, so the template starts with it (consumers
    tokenize a rendered chat without adding special tokens)."""
    default = json.dumps(system, ensure_ascii=False)
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = " + default + " -%}{%- set turns = messages -%}"
        "{%- endif -%}"
        + ("{{- bos_token -}}" if with_bos else "")
        + "{{- '### Instruction:\\n' + system + '\\n\\n' -}}"
        "{%- for m in turns -%}"
        "{%- if m['role'] == 'user' -%}"
        "{{- '### Question:\\n' + m['content'] + '\\n\\n' -}}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{%- set answer = m['content'] -%}"
        "{%- if '</think>' in answer -%}{%- set answer = answer.split('</think>')[-1].lstrip() -%}{%- endif -%}"
        "{{- '### Response:\\n' + answer + eos_token + '\\n\\n' -}}"
        "{%- else -%}"
        "{{- raise_exception('Only a first system message, then user and assistant messages, are supported.') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
    )


def adds_bos(tok: Any) -> bool:
    """Whether the tokenizer puts a BOS in front when it adds special tokens."""
    if tok.bos_token_id is None:
        return False
    ids = tok("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def chat_template(fmt: str, system: str, tok: Any) -> str:
    """The chat template a model trained with `data.prompt_format` = fmt must carry."""
    if fmt == "seed":
        return seed_chat_template(system, adds_bos(tok))
    if not tok.chat_template:
        raise ValueError("data.prompt_format 'chat_template' needs a base tokenizer with a chat template")
    return tok.chat_template


class Prompter:
    """Renders prompts the way the model was trained, for one tokenizer and `data.prompt_format`."""

    def __init__(self, fmt: str, system: str, tok: Any) -> None:
        self.fmt, self.system, self.tok = fmt, system, tok
        self.eos = tok.eos_token

    def prompt(self, question: str) -> str:
        """The text before the model's answer (no BOS: tokenizing with special tokens adds it)."""
        if self.fmt == "seed":
            return render_prompt(self.system, question)
        text = self.tok.apply_chat_template(
            [{"role": "system", "content": self.system}, {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True,
        )
        bos = self.tok.bos_token
        return text[len(bos):] if bos and adds_bos(self.tok) and text.startswith(bos) else text

    def opened_think(self, prompt: str) -> bool:
        """Templates like DeepSeek-R1's end the generation prompt with `<think>\\n` themselves."""
        return prompt.endswith(THINK_OPEN + "\n")

    def completion(self, prompt: str, cot: str | None, answer: str) -> str:
        """The trained part after `prompt`: `render_completion`, less what the template already wrote."""
        return self.after_prompt(prompt, render_completion(cot, answer, self.eos))

    def after_prompt(self, prompt: str, completion: str) -> str:
        return completion.removeprefix(THINK_OPEN + "\n") if self.opened_think(prompt) else completion

    def as_generated(self, prompt: str, generated: str) -> str:
        """The model's whole answer: what the template wrote of it (an opened `<think>`) + the generated text."""
        return (THINK_OPEN + "\n" + generated) if self.opened_think(prompt) else generated


def decoding(gen: Any, base_dir: Path | None) -> dict[str, Any]:
    """The decoding defaults: params `generate`, where a key is `auto` the base's own
    generation_config.json (e.g. R1-distill: 0.6 / 0.95), else R1's published values."""
    base: dict[str, Any] = {}
    p = base_dir / "generation_config.json" if base_dir is not None else None
    if p is not None and p.exists():
        base = json.loads(p.read_text(encoding="utf-8"))
    out: dict[str, Any] = {}
    for k, r1 in R1_DECODING.items():
        v = getattr(gen, k)
        out[k] = (base.get(k, r1) if v == "auto" else v)
    out["do_sample"] = bool(out["do_sample"])
    out["temperature"], out["top_p"], out["top_k"] = float(out["temperature"]), float(out["top_p"]), int(out["top_k"])
    out["max_new_tokens"] = int(gen.max_new_tokens)
    return out
