"""MCQ scoring scores the tokens the model would write (issue 26): lm-eval's context/continuation split
for SmolLM2's and Qwen2's (R1-distill's) vocabularies, the one-forward path equal to the per-option
path on a tiny model, the MCQ sample independent of train.seed, and lm-eval's kormedmcqa protocol."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from kmed.evaluation import (
    ANSWER_CUE,
    KORMEDMCQA_UNTIL,
    LETTERS,
    encode_pair,
    kormedmcqa_choice,
    kormedmcqa_cut,
    kormedmcqa_prompt,
    mcq_context,
    mcq_question_text,
)
from kmed.prompt import Prompter, render_prompt

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "당신은 한의학 전문가입니다."
ITEM = {"id": "x1", "question": "맥버니 점에 압통이 있다. 가장 가능성이 높은 진단은?",
        "options": {"A": "급성 위장관염", "B": "급성 충수염", "C": "요관결석", "D": "게실염", "E": "크론병"},
        "answer": "B"}
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-R1-Distill-Qwen's generation prompt (its current revision opens the think block itself).
R1_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
               "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def qwen2_tokenizer(corpus: list[str]) -> Any:
    """A byte-level BPE with Qwen2's pre-tokenizer (the split regex and byte mapping of Qwen2's and
    R1-distill's tokenizer.json), R1-distill's BOS/EOS and its <think> tokens; the merges are trained
    here on `corpus`, since the real 151k-token vocabulary is on no offline path that CI has. Where
    continuations split is the pre-tokenizer's doing ("정답:" | " A"), not the merges'."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from kmed.modeling import _QWEN2_RE

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tk.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   chat_template=R1_TEMPLATE)


@pytest.fixture(scope="module")
def qwen2_tok() -> Any:
    corpus = [render_prompt(SYSTEM, mcq_question_text(ITEM)), *ITEM["options"].values()]
    return qwen2_tokenizer(corpus * 5 + [f"정답: {k}" for k in LETTERS] * 20)


def real_qwen_tokenizer() -> Any | None:
    """The real Qwen vocabulary (the BPE ranks Qwen2 and R1-distill keep as token ids) where a copy is
    at hand: $KMED_QWEN_TIKTOKEN, or the qwen.tiktoken that the `dashscope` package ships. None else."""
    path = os.environ.get("KMED_QWEN_TIKTOKEN")
    spec = importlib.util.find_spec("dashscope") if not path else None
    if spec and spec.origin:
        path = str(Path(spec.origin).parent / "resources/qwen.tiktoken")
    if not path or not Path(path).is_file():
        return None
    import base64

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from kmed.modeling import _QWEN2_RE

    ranks = {base64.b64decode(a): int(b) for a, b in (ln.split() for ln in Path(path).read_bytes().splitlines() if ln)}
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    merges = []
    for t, r in ranks.items():  # transformers' TikTokenConverter: merges recovered from the ranks
        pairs = [(t[:i], t[i:], r) for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
        merges += sorted(pairs, key=lambda m: (ranks[m[0]], ranks[m[1]]))
    merges.sort(key=lambda m: m[2])
    tk = Tokenizer(models.BPE({s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for a, b, _ in merges], fuse_unk=False))
    tk.model.ignore_merges = True
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("<think>", "</think>")])
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def _check_writes_letters(tok: Any, fmt: str = "seed") -> list[int]:
    """Each option's continuation is the one token the tokenizer writes for " X" after "정답:"."""
    ctx_text = mcq_context(Prompter(fmt, SYSTEM, tok), ITEM)
    assert ctx_text.endswith("</think>\n" + ANSWER_CUE)
    ids = []
    for k in ITEM["options"]:
        ctx, cont, aligned = encode_pair(tok, ctx_text, k)
        whole = tok(ctx_text + k, add_special_tokens=True)["input_ids"]
        assert aligned and ctx + cont == whole  # the continuation is what tokenizing "…정답: X" ends with
        assert len(cont) == 1 and tok.decode(cont) == f" {k}"  # " A": the space belongs to the letter
        assert tok.decode(ctx[-1:]) == ":"  # no lone space token left at the end of the context
        # The old rule scored the bare letter after a trailing-space token: a sequence never written.
        assert tok(ctx_text, add_special_tokens=True)["input_ids"][-1] != ctx[-1]
        assert tok(k, add_special_tokens=False)["input_ids"] != cont
        ids += cont
    return ids


def test_smollm2_continuations_are_the_written_tokens(smol_tokenizer: Any) -> None:
    assert _check_writes_letters(smol_tokenizer) == [330, 389, 340, 422, 414]  # "ĠA" … "ĠE"


def test_qwen2_continuations_are_the_written_tokens(qwen2_tok: Any) -> None:
    ids = _check_writes_letters(qwen2_tok)
    assert qwen2_tok.convert_ids_to_tokens(ids) == [f"Ġ{k}" for k in LETTERS]
    assert qwen2_tok("x")["input_ids"][0] == qwen2_tok.bos_token_id  # R1-distill adds a BOS: both encodings have it


def test_qwen2_chat_template_prompt_keeps_one_think_block(qwen2_tok: Any) -> None:
    """With data.prompt_format chat_template and R1-distill's template (which opens <think> itself),
    the scored context closes that block instead of opening a second one."""
    ctx_text = mcq_context(Prompter("chat_template", SYSTEM, qwen2_tok), ITEM)
    assert ctx_text.endswith("<｜Assistant｜><think>\n\n</think>\n정답: ") and ctx_text.count("<think>") == 1
    assert not ctx_text.startswith(BOS)  # the tokenizer adds it
    _check_writes_letters(qwen2_tok, "chat_template")


def test_real_qwen_vocabulary_continuations() -> None:
    tok = real_qwen_tokenizer()
    if tok is None:
        pytest.skip("no copy of the real Qwen vocabulary (KMED_QWEN_TIKTOKEN=path/to/qwen.tiktoken)")
    assert _check_writes_letters(tok) == [362, 425, 356, 422, 468]  # Qwen2's "ĠA" … "ĠE"
    assert tok("정답: ", add_special_tokens=False)["input_ids"] == [29281, 132760, 25, 220]  # 정, 답, :, Ġ


# --------------------------------------------------------------------------- scoring on a tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from kmed.modeling import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_model_dir)
    model.eval()
    return model, load_tokenizer(tiny_model_dir)


def _reference(model: Any, ctx: list[int], cont: list[int]) -> float:
    """Summed log-prob of cont after ctx from the full model's logits, one unpadded sequence."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont))


def test_one_forward_path_equals_per_option_path_and_full_logits(tiny: tuple[Any, Any]) -> None:
    from stages.evaluate import continuation_logprobs, mcq_scores

    model, tok = tiny
    prompter = Prompter("seed", SYSTEM, tok)
    items = [ITEM, {**ITEM, "id": "x2", "question": "짧은 질문?"},
             {**ITEM, "id": "x3", "options": {k: ITEM["options"][k] for k in "ABCD"}}]
    rows: list[int] = []  # sequences through the backbone
    hook = model.model.register_forward_hook(lambda _m, _i, out: rows.append(out.last_hidden_state.shape[0]))
    try:
        fast = mcq_scores(model, tok, prompter, items, batch=2)
        assert sum(rows) == len(items)  # one forward per item: every option is one token
        rows.clear()
        slow = mcq_scores(model, tok, prompter, items, batch=3, share=False)
        assert sum(rows) == sum(len(it["options"]) for it in items)
    finally:
        hook.remove()
    for f, s, it in zip(fast, slow, items, strict=True):
        assert set(f) == set(it["options"])
        assert f == pytest.approx(s, abs=1e-4)
        ctx, cont, _ = encode_pair(tok, mcq_context(prompter, it), "A")
        assert f["A"] == pytest.approx(_reference(model, ctx, cont), abs=1e-4)
    # Multi-token continuations (the option texts): grouped rows, one row per option and the full
    # logits agree, after a context with and without a trailing space.
    ctx_text = mcq_context(prompter, ITEM)
    req = []
    for text in (ctx_text, ctx_text[:40] + " "):
        ctx, conts = [], {}
        for k, v in ITEM["options"].items():
            ctx, conts[k], _ = encode_pair(tok, text, v)
        assert max(len(c) for c in conts.values()) > 1
        req.append((ctx, conts))
    shared = continuation_logprobs(model, req, 4, tok.pad_token_id)
    own = continuation_logprobs(model, req, 3, tok.pad_token_id, share=False)
    for (ctx, conts), a, b in zip(req, shared, own, strict=True):
        for k, cont in conts.items():
            assert a[k] == pytest.approx(b[k], abs=1e-4)
            assert a[k] == pytest.approx(_reference(model, ctx, cont), abs=1e-4)


def test_mcq_items_follow_evaluate_seed_not_train_seed(tmp_path: Path) -> None:
    import yaml

    from kmed.config import load_params
    from stages.evaluate import mcq_sample

    items = [{"id": f"{s}{i}", "subject": s, "file": "f.csv"} for s in ("doctor", "nurse", "pharm") for i in range(40)]

    def sample(section: str, seed: int) -> list[str]:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        raw[section]["seed"] = seed
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        return [it["id"] for it in mcq_sample(load_params(tmp_path / "p.yaml"), items)]

    base = sample("train", 3407)
    assert 0 < len(base) < len(items)
    assert sample("train", 1) == base  # a new training seed evaluates the same items
    assert sample("evaluate", 1) != base  # the evaluate seed is the one that picks them


# --------------------------------------------------------------------------- lm-eval's kormedmcqa protocol


def test_kormedmcqa_prompt_cut_and_choice() -> None:
    assert kormedmcqa_prompt({**ITEM, "question": " 질문? \n"}) == (
        "질문?\nA. 급성 위장관염\nB. 급성 충수염\nC. 요관결석\nD. 게실염\nE. 크론병\n정답：")
    assert kormedmcqa_cut(" B. 급성 충수염입니다", "</s>") == (" B", True)
    assert kormedmcqa_cut(" B\n\nQ: 다음", None) == (" B", True)
    assert kormedmcqa_cut(" B 급성", "<eos>") == (" B 급성", False)
    for text, want in [(" B", "B"), ("정답: c", "C"), ("정답은 D 입니다", "D"), ("A. 아니고 E. 입니다", "E"),
                       ("답은 (A) 또는 (C)", "C"), ("모르겠다", ""), ("ABC", "")]:
        assert kormedmcqa_choice(text) == want, text
    assert "." in KORMEDMCQA_UNTIL and "\n\n" in KORMEDMCQA_UNTIL


def test_kormedmcqa_matches_the_installed_lm_eval_task() -> None:
    """Our copy of the task against lm-eval's own files, where the `bench` extra is installed."""
    pytest.importorskip("lm_eval")
    import yaml
    from lm_eval.tasks.kormedmcqa.utils import extract_choice

    for text in ("정답: c", "정답은 D 입니다", "A. 아니고 E. 입니다", "답은 (A) 또는 (C)", "모르겠다", " b.", "E"):
        assert kormedmcqa_choice(text) == extract_choice(text), text
    spec = importlib.util.find_spec("lm_eval")
    assert spec and spec.origin
    raw = (Path(spec.origin).parent / "tasks/kormedmcqa/_template_yaml").read_text(encoding="utf-8")
    cfg = yaml.safe_load(raw.replace("!function", ""))
    assert tuple(cfg["generation_kwargs"]["until"]) == KORMEDMCQA_UNTIL
    from jinja2 import Template

    doc = {"question": ITEM["question"], **ITEM["options"], "answer": 2}
    assert Template(cfg["doc_to_text"]).render(**doc) == kormedmcqa_prompt(ITEM)


@pytest.mark.parametrize("protocol", ["r1", "kormedmcqa"])
def test_evaluate_model_mcq_protocols(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      protocol: str) -> None:
    """The stage's MCQ block on the tiny model: letter scoring plus either generation protocol."""
    import yaml

    from kmed.config import load_params
    from stages.evaluate import evaluate_model

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["evaluate"].update(mcq_generate=protocol, max_new_tokens=4, batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    params = load_params(tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    (tmp_path / "models/base").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    items = [ITEM, {**ITEM, "id": "x2", "answer": "D"}, {**ITEM, "id": "x3", "answer": "E"}]
    sets = {"mcq": items, "koen": [], "val_stage1": [], "val_stage2": [], "format_questions": [],
            "decoding": {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 8}}
    m, _ = evaluate_model("base", params, sets)
    assert m["mcq_n"] == 3 and m["mcq_acc"] in (0, 1 / 3, 2 / 3, 1)
    assert m["mcq_gen_acc"] in (0, 1 / 3, 2 / 3, 1) and m["mcq_gen_acc_lo"] <= m["mcq_gen_acc"] <= m["mcq_gen_acc_hi"]
    assert ("mcq_gen_unstopped" in m) is (protocol == "kormedmcqa")
