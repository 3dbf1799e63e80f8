"""The chat template merge writes into a merged folder (stages/merge.py `write_model_files`), without the
merge itself: the tokenizer saved there renders the training prompt, not the base's own template.

Fast (a tiny Qwen2 with the SmolLM2 tokenizer, whose own template is ChatML): the pipeline and security
tests check the same through export, in minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kmed.config import load_params
from kmed.merging import BaseWeights
from kmed.modeling import load_tokenizer
from kmed.prompt import Prompter, adds_bos, chat_template, decoding
from stages.merge import write_model_files

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a careful Korean medical assistant."
QUESTION = "고혈압의 1차 치료제를 설명해 주세요."


def _write(tiny_model_dir: Path, out: Path, fmt: str) -> tuple[Any, str]:
    """write_model_files as merge calls it, for `data.prompt_format` = fmt; the base tokenizer and the template."""
    base_tok = load_tokenizer(tiny_model_dir)
    template = chat_template(fmt, SYSTEM, base_tok)
    dec = decoding(load_params(ROOT / "params.yaml").generate, tiny_model_dir)
    out.mkdir()
    write_model_files(out, BaseWeights(tiny_model_dir), load_tokenizer(tiny_model_dir), "bf16", False, template, dec)
    return base_tok, template


def test_merged_tokenizer_carries_the_training_prompt_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    base_tok, template = _write(tiny_model_dir, tmp_path / "merged", "seed")
    assert base_tok.chat_template and "<|im_start|>" in base_tok.chat_template  # the base's own: ChatML

    merged = load_tokenizer(tmp_path / "merged")
    assert merged.chat_template == template
    want = Prompter("seed", SYSTEM, merged).prompt(QUESTION)
    msgs = [{"role": "user", "content": QUESTION}]
    text = merged.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (merged.bos_token if adds_bos(merged) else "") + want
    ids = merged.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == merged(want, add_special_tokens=True)["input_ids"]  # token for token, as trained
    assert "<|im_start|>" not in text


def test_prompt_format_chat_template_keeps_the_base_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    base_tok, template = _write(tiny_model_dir, tmp_path / "merged", "chat_template")
    assert template == base_tok.chat_template
    assert load_tokenizer(tmp_path / "merged").chat_template == base_tok.chat_template
