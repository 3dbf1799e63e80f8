"""kmed/prompt.py: the training prompt and the exported chat template cannot drift, for any tokenizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from kmed.config import GenerateCfg
from kmed.prompt import Prompter, adds_bos, chat_template, decoding, render_completion, render_prompt

SYSTEM = 'You are a medical expert. Think inside <think></think>. "Quotes", \\backslash, 한국어.'
QUESTIONS = ["What is the antidote for acetaminophen overdose?", "당뇨병 환자에게 메트포르민을 처방할 때 주의할 점은?",
             "Line one\n\nline two {{ not jinja }} {% raw %}"]
# DeepSeek-R1-Distill-Qwen's template (revision d66bcfc…, abridged to its message loop): BOS, <｜User｜>,
# <｜Assistant｜>, and a generation prompt that opens the <think> block itself.
R1_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def bos_tokenizer(smol_tokenizer):  # noqa: ANN001, ANN201
    """The SmolLM2 vocabulary with a BOS added in front, as Qwen2/R1-distill tokenizers do."""
    from tokenizers import processors

    tok = copy.deepcopy(smol_tokenizer)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("which", ["smol", "bos"])
def test_chat_template_equals_render_prompt_byte_for_byte_and_token_for_token(
        which: str, smol_tokenizer, bos_tokenizer) -> None:  # noqa: ANN001
    tok = copy.deepcopy(smol_tokenizer if which == "smol" else bos_tokenizer)
    assert adds_bos(tok) is (which == "bos")
    tok.chat_template = chat_template("seed", SYSTEM, tok)
    for q in QUESTIONS:
        msgs = [{"role": "user", "content": q}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text == (tok.bos_token if which == "bos" else "") + render_prompt(SYSTEM, q)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(ids) == tok(render_prompt(SYSTEM, q), add_special_tokens=True)["input_ids"]


def test_a_system_message_replaces_the_default_and_history_keeps_only_answers(smol_tokenizer) -> None:  # noqa: ANN001
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = chat_template("seed", SYSTEM, tok)
    msgs = [{"role": "system", "content": "Other system."}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "<think>\nlong reasoning\n</think>\nanswer one"},
            {"role": "user", "content": "q2"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("### Instruction:\nOther system.\n\n### Question:\nq1\n\n### Response:\nanswer one"
                    + tok.eos_token + "\n\n### Question:\nq2\n\n### Response:\n")
    assert "long reasoning" not in text
    # Without the generation prompt the chat ends after the question, as a prompt the model continues.
    assert not tok.apply_chat_template(msgs[1:2], tokenize=False).endswith("### Response:\n")


def test_the_template_passes_the_export_safety_check(smol_tokenizer) -> None:  # noqa: ANN001
    from kmed.ggufio import check_chat_template

    check_chat_template(chat_template("seed", SYSTEM, smol_tokenizer))


def test_llama_cpp_renders_the_template_like_render_prompt(smol_tokenizer) -> None:  # noqa: ANN001
    """llama-cpp-python's own Jinja formatter (what create_chat_completion and its server use)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(chat_template("seed", SYSTEM, smol_tokenizer), eos_token="<|im_end|>",
                              bos_token="<|im_start|>")
    out = fmt(messages=[{"role": "user", "content": QUESTIONS[1]}])
    assert out.prompt == render_prompt(SYSTEM, QUESTIONS[1])


def test_prompt_format_chat_template_uses_the_base_template(smol_tokenizer) -> None:  # noqa: ANN001
    tok = smol_tokenizer  # ChatML: <|im_start|>system … <|im_start|>assistant\n
    p = Prompter("chat_template", SYSTEM, tok)
    prompt = p.prompt("q?")
    assert prompt == tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q?"}],
                                             tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert p.completion(prompt, "cot", "ans") == render_completion("cot", "ans", tok.eos_token)
    assert chat_template("chat_template", SYSTEM, tok) == tok.chat_template


def test_a_template_that_opens_think_itself_gets_completions_without_it(bos_tokenizer) -> None:  # noqa: ANN001
    tok = copy.deepcopy(bos_tokenizer)
    tok.chat_template = R1_TEMPLATE
    p = Prompter("chat_template", SYSTEM, tok)
    prompt = p.prompt("q?")
    assert not prompt.startswith(tok.bos_token)  # tokenizing adds it
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert p.completion(prompt, "cot", "ans") == "cot\n</think>\nans" + tok.eos_token
    assert p.as_generated(prompt, "cot\n</think>\nans") == "<think>\ncot\n</think>\nans"
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


def test_decoding_defaults_come_from_the_base_else_r1(tmp_path: Path) -> None:
    auto = GenerateCfg()
    assert decoding(auto, None) == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0,
                                    "max_new_tokens": 1024}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8}))
    assert decoding(auto, tmp_path)["temperature"] == 0.7 and decoding(auto, tmp_path)["top_p"] == 0.8
    assert decoding(auto, tmp_path)["top_k"] == 0  # not in the base's file: R1's
    fixed = GenerateCfg(temperature=0.3, top_p=1.0, top_k=20, max_new_tokens=64)
    assert decoding(fixed, tmp_path) == {"do_sample": True, "temperature": 0.3, "top_p": 1.0, "top_k": 20,
                                         "max_new_tokens": 64}
    assert decoding(GenerateCfg(do_sample=False), None)["do_sample"] is False


def test_generate_params_are_checked() -> None:
    with pytest.raises(ValueError, match="generate.temperature"):
        GenerateCfg(temperature=0.0)
    with pytest.raises(ValueError, match="generate.top_p"):
        GenerateCfg(top_p=1.5)
