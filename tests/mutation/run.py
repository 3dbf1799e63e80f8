"""Mutation check of docs/reliability.md: break each protection with one small edit, run the test its row
lists, and say whether the test noticed.

    .venv/bin/python tests/mutation/run.py                    # every mutation (about an hour on 2 cores)
    .venv/bin/python tests/mutation/run.py --only rrn-hyphen --only export-checks-in-process
    .venv/bin/python tests/mutation/run.py --list             # the table, nothing run
    .venv/bin/python tests/mutation/run.py --baseline         # the listed tests on the unmutated tree

For each mutation: the repo's files (`git ls-files`, also untracked ones not ignored) are copied into a
temporary folder, the edit is applied there (its `old` text must occur exactly once, so a refactor cannot
make a mutation silently inert), and the row's tests run in that copy (`python -m pytest -x`, PYTHONPATH
at the copy). One line per mutation: `caught` (a listed test failed), `survived` (they all passed),
`not run` (skipped: a skip proves nothing) or `error` (collection error, timeout). Exit 1 unless every
mutation was caught. Not part of `make test` (`make mutation` runs it); tests/mutation/test_table.py,
which is, keeps the table true to the tree and to docs/reliability.md.

A new protection in docs/reliability.md's killed stages, bad inputs or security sections comes with
its mutation here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str  # what --only takes
    row: str  # the start of the docs/reliability.md row (its first cell) whose protection this breaks
    file: str
    edits: tuple[tuple[str, str], ...]  # (old, new); usually one, two where the code guards twice
    tests: tuple[str, ...]  # pytest node ids; -x stops at the first failure, so the row's own test goes first


def m(name: str, row: str, file: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, row, file, ((old, new),), tests)


KILLED = "tests/reliability/test_killed_stages.py::"
DISK = "tests/reliability/test_resume_and_disk_full.py::"
BAD = "tests/reliability/test_bad_inputs.py::"
BAD_INPUT = BAD + "test_bad_input_fails_with_one_sentence_and_loses_nothing"
REAL = "tests/test_real_exports.py::"
SEC = "tests/reliability/test_security.py::"
SERVE = "tests/test_serve.py::"
SERVE_SOAK = "tests/test_serve_soak.py::"
NULL = '__import__("contextlib").nullcontext'  # a `with` that writes in place instead of atomic_dir's temp

MUTATIONS: tuple[Mutation, ...] = (
    # ---- killed or failing stages -------------------------------------------------------------------
    m("atomic-dir-no-restore", "`kmed.io.atomic_dir` killed", "kmed/io.py",
      "            prev.rename(final)", "            shutil.rmtree(prev, ignore_errors=True)",
      KILLED + "test_atomic_dir_killed_mid_write_or_between_renames"),
    m("atomic-dir-keeps-stale-tmp", "`kmed.io.atomic_dir` killed", "kmed/io.py",
      "        shutil.rmtree(stale, ignore_errors=True)", "        pass",
      KILLED + "test_atomic_dir_killed_mid_write_or_between_renames"),
    m("preprocess-in-place", "preprocess SIGKILLed mid-write", "stages/preprocess.py",
      "with atomic_dir(OUT_DIR) as tmp:", f"with {NULL}(OUT_DIR) as tmp:",
      KILLED + "test_preprocess_killed_mid_write_under_dvc"),
    m("preprocess-in-place-dvc-killed", "`dvc repro` and its stage SIGKILLed", "stages/preprocess.py",
      "with atomic_dir(OUT_DIR) as tmp:", f"with {NULL}(OUT_DIR) as tmp:",
      KILLED + "test_dvc_repro_killed_keeps_lock_and_reruns"),
    m("sft-finished-checkpoint-trains-on", "sft SIGKILLed while promoting", "stages/sft.py",
      "            if finished:", "            if False:",
      KILLED + "test_sft_killed_mid_adapter_write_keeps_previous_adapter"),
    m("sft-adapter-in-place", "sft SIGKILLed while promoting", "stages/sft.py",
      "        with atomic_dir(out) as tmp:", f"        with {NULL}(out) as tmp:",
      KILLED + "test_sft_killed_mid_adapter_write_keeps_previous_adapter"),
    m("merge-in-place", "merge SIGKILLed", "stages/merge.py",
      "    with atomic_dir(out) as tmp:", f"    with {NULL}(out) as tmp:",
      KILLED + "test_merge_killed_mid_write_leaves_no_merged_model"),
    m("export-in-place", "export SIGKILLed", "stages/export.py",
      "    with atomic_dir(OUT) as tmp:", f"    with {NULL}(OUT) as tmp:",
      KILLED + "test_export_killed_mid_write_leaves_no_export"),
    m("checkpoint-adapter-not-read", "sft resume: newest checkpoint truncated", "stages/sft.py",
      '        with safe_open(str(ck / "adapter_model.safetensors"), "pt") as f:\n'
      "            for k in f.keys():\n                f.get_tensor(k)\n", "",
      "tests/test_sft.py::test_kill_then_rerun_resumes_and_skips_a_truncated_checkpoint"),
    m("checkpoint-trainer-state-not-read", "sft resume: newest checkpoint lost", "stages/sft.py",
      '        state = json.loads((ck / "trainer_state.json").read_text())', '        state = {"global_step": 0}',
      DISK + "test_resume_skips_a_checkpoint_whose_trainer_state_was_deleted"),
    m("fingerprint-not-compared", "sft rerun after a code change", "stages/sft.py",
      "    if not stamp.exists() or stamp.read_text().strip() != fp:", "    if not stamp.exists():",
      "tests/test_sft.py::test_checkpoint_fingerprint_covers_the_training_code",
      "tests/test_sft.py::test_checkpoints_of_another_config_are_not_resumed"),
    m("fingerprint-without-code", "sft rerun after a code change", "stages/sft.py",
      '    for code in [Path(__file__).resolve(), *sorted((root / "kmed").glob("*.py"))]:', "    for code in []:",
      "tests/test_sft.py::test_checkpoint_fingerprint_covers_the_training_code"),
    m("isolated-in-process", "llama.cpp dies in export", "kmed/ggufio.py",
      "            return pool.submit(fn, *args).result()", "            return fn(*args)",
      "tests/test_export_gpu.py::test_llama_cpp_work_runs_in_a_process_of_its_own_and_a_crash_there_is_one_sentence"),
    m("export-checks-in-process", "llama.cpp dies in export", "stages/export.py",
      "isolated(gguf_checks, ", "gguf_checks(",
      KILLED + "test_llama_cpp_never_runs_in_the_export_process"),
    m("export-quantize-in-process", "llama.cpp dies in export", "stages/export.py",
      "isolated(quantize, ", "quantize(",
      KILLED + "test_llama_cpp_never_runs_in_the_export_process"),
    m("export-backend-probe-in-process", "llama.cpp dies in export", "stages/export.py",
      "isolated(gpu_backend)", "gpu_backend()",
      KILLED + "test_llama_cpp_never_runs_in_the_export_process"),
    m("gguf-repack-on", "llama.cpp segfaults on an AMX CPU", "kmed/ggufio.py",
      "        params.use_extra_bufts = False", "        params.use_extra_bufts = True",
      "tests/test_export_gpu.py::test_a_quantized_gguf_decodes_a_batch_on_any_cpu"),
    m("nan-not-detected", "NaN loss", "stages/sft.py",
      '            if not math.isfinite(loss) or not math.isfinite(row["grad_norm"]):', "            if False:",
      "tests/test_sft.py::test_nan_loss_stops_fast_and_promotes_nothing"),
    m("nan-run-promoted", "NaN loss", "stages/sft.py",
      "        if cb.nan_step is not None:", "        if False:",
      "tests/test_sft.py::test_nan_loss_stops_fast_and_promotes_nothing"),
    m("checkpoint-enospc-not-recognised", "disk full while saving a checkpoint", "stages/sft.py",
      "            if no_space(e, ckdir):", "            if False:",
      DISK + "test_disk_full_while_saving_a_checkpoint"),
    m("atomic-dir-enospc-not-recognised", "disk full while writing preprocess output", "kmed/io.py",
      "        full = no_space(e, tmp)", "        full = False",
      DISK + "test_disk_full_while_writing_preprocess_output"),
    m("atomic-dir-keeps-partial-copy", "disk full while writing preprocess output", "kmed/io.py",
      "        shutil.rmtree(tmp, ignore_errors=True)", "        pass",
      DISK + "test_disk_full_while_writing_preprocess_output"),
    m("text-writer-enospc-not-recognised", "disk full in the shared writers", "kmed/io.py",
      "        if no_space(e):", "        if False:",
      DISK + "test_disk_full_in_atomic_writers_is_one_sentence_naming_the_path"),
    m("torch-save-enospc-not-recognised", "disk full in the shared writers", "kmed/io.py",
      '        if where is not None and "inline_container" in str(e):', "        if False:",
      DISK + "test_disk_full_in_atomic_writers_is_one_sentence_naming_the_path"),
    m("export-token-agreement-not-gated", "a GGUF whose greedy token agreement is under", "stages/export.py",
      "        if min_agree is not None and agree < min_agree:", "        if False:",
      KILLED + "test_export_under_its_token_agreement_threshold_fails_and_keeps_the_previous_export"),
    m("stage1-retention-not-judged", "sft-stage2 starting from a model that lost stage 1", "stages/sft.py",
      '    if m["stage1_retained"] < need:', "    if False:",
      "tests/test_sft.py::test_stage2_that_starts_without_stage1_fails_before_training"),
    m("frozen-stage1-not-restored", "stage 1's LoRA inside stage 2's", "stages/sft.py",
      "            frozen.restore()  # after the optimizer step", "            pass  # after the optimizer step",
      "tests/test_sft.py::test_stage2_new_adapter_on_stage1_starts_where_stage1_ended"),
    m("frozen-stage1-not-copied", "stage 1's LoRA inside stage 2's", "stages/sft.py",
      "                p[part].copy_(w.to(p.dtype))", "                pass",
      "tests/test_sft.py::test_stage2_new_adapter_on_stage1_starts_where_stage1_ended"),
    # ---- bad inputs ---------------------------------------------------------------------------------
    Mutation("empty-file-read-as-no-rows", "empty file, wrong columns", "kmed/data.py",
             (("    if not data.strip():\n", "    if False:\n"), ("    if not seen:\n", "    if False:\n")),
             (BAD_INPUT + "[empty file]",)),
    m("missing-columns-ignored", "empty file, wrong columns", "kmed/data.py",
      "    if missing:\n        word =", "    if False:\n        word =",
      BAD_INPUT + "[wrong columns]"),
    m("formula-without-value-read-as-empty", "empty file, wrong columns", "kmed/data.py",
      "                    if f is not None and vals[c] is None:", "                    if False:",
      BAD_INPUT + "[formula cell]"),
    m("dotdot-path-allowed", "empty file, wrong columns", "kmed/data.py",
      '    if ".." in p.parts or (p.is_absolute() and not _inside(p.resolve(), root)):',
      "    if p.is_absolute() and not _inside(p.resolve(), root):",
      BAD_INPUT + "[path with ..]"),
    m("absolute-path-allowed", "empty file, wrong columns", "kmed/data.py",
      '    if ".." in p.parts or (p.is_absolute() and not _inside(p.resolve(), root)):', '    if ".." in p.parts:',
      BAD_INPUT + "[absolute path]"),
    m("source-symlink-followed", "empty file, wrong columns", "kmed/data.py",
      "        if not _inside(full.resolve(), root):", "        if False:",
      BAD_INPUT + "[symlink out of the repo]"),
    m("folder-file-symlink-followed", "empty file, wrong columns", "kmed/data.py",
      "        if not _inside(f.resolve(), root):", "        if False:",
      BAD_INPUT + "[symlink inside a source folder]", "tests/test_data.py::test_paths_escaping_the_repo_are_refused"),
    m("stage-error-as-traceback", "empty file, wrong columns", "kmed/io.py",
      "    except (ParamsError, StageError) as e:", "    except ParamsError as e:",
      BAD_INPUT + "[empty file]"),
    m("xlsx-size-not-checked", "xlsx bomb", "kmed/data.py",
      "    if total > max_mb * 2**20:", "    if False:",
      BAD + "test_xlsx_bomb_is_refused_quickly_without_inflating_it"),
    m("cp949-as-latin1", "CP949 CSV", "kmed/data.py",
      '            text = data.decode("cp949")', '            text = data.decode("latin-1")',
      BAD + "test_cp949_csv_is_read_correctly"),
    m("exact-duplicates-kept", "duplicates", "kmed/data.py",
      "        if row.raw in seen_raw:", "        if False:",
      BAD + "test_duplicates_are_dropped_and_counted"),
    m("normalised-duplicates-kept", "duplicates", "kmed/data.py",
      "        if key in seen_norm:", "        if False:",
      BAD + "test_duplicates_are_dropped_and_counted"),
    m("rrn-hyphen-required", "a Korean RRN in a record", "kmed/data.py",
      "(?:0[1-9]|[12]\\d|3[01])-?[1-8]", "(?:0[1-9]|[12]\\d|3[01])-[1-8]",
      BAD + "test_rrn_is_masked_by_default", "tests/test_data.py::test_pii_masking"),
    m("overlong-dropped-not-truncated", "a record over `model.max_seq_length` by its CoT", "kmed/data.py",
      '            if cfg.overlong == "truncate":\n                cut = truncate_completion(',
      "            if False:\n                cut = truncate_completion(",
      BAD + "test_overlong_record_is_truncated_to_fit"),
    m("case-variant-column-read-silently", "a JSON array with `question` and `Question`", "kmed/data.py",
      "        if variants:\n            has =", "        if False:\n            has =",
      BAD_INPUT + "[unmapped field next to a case variant]"),
    m("source-loss-not-contracted", "60 % of a source's instruction records", "kmed/data.py",
      "        elif loss.share > cfg.max_loss_share:", "        elif False:",
      BAD_INPUT + "[instruction records over the limit]"),
    m("empty-source-accepted", "Ko-En eval pairs equal to a training xlsx", "kmed/data.py",
      "            if not src.allow_empty:\n                problems.append(loss.empty()[:-1])",
      "            if False:\n                problems.append(loss.empty()[:-1])",
      BAD_INPUT + "[eval pairs equal to a training source]"),
    m("cot-sliver-kept", "a CoT that fits only cut to a sliver", "kmed/data.py",
      "        if keep < min_cot or keep < min_keep_share * len(c_ids):", "        if keep < min_cot:",
      BAD + "test_a_cot_that_would_keep_a_sliver_is_dropped_and_counted"),
    m("xlsx-error-without-sheet-hint", "an AI Hub-style workbook whose description sheet", "kmed/data.py",
      "            if len(wb.sheetnames) > 1\n            else \"\"", "            if False\n            else \"\"",
      "tests/test_data.py::test_xlsx_description_sheet_error_names_the_sheet_param"),
    m("share-rounded-twice", "the same share in the error and the report", "kmed/data.py",
      '    return f"{n / d if d else 0.0:.1%}"', '    return f"{round(n / d, 4) if d else 0.0:.1%}"',
      "tests/test_data.py::test_report_and_error_round_a_share_the_same"),
    m("rrn-foreign-residents-unmasked", "a foreign resident's RRN", "kmed/data.py",
      "-?[1-8]\\d{6}(?!\\d)", "-?[1-4]\\d{6}(?!\\d)",
      "tests/test_data.py::test_foreign_residents_rrns_are_masked_with_and_without_the_hyphen"),
    m("translation-language-not-checked", "a translation mapping that is swapped", "kmed/data.py",
      '        if src.task == "translation":\n            check_languages(',
      '        if False:\n            check_languages(',
      REAL + "test_a_swapped_or_id_translation_mapping_is_refused_with_the_measured_shares"),
    m("non-text-read-as-text", "numbers where text belongs", "kmed/data.py",
      "        if odd:  # fail lists every value; count counts rows (one loss each)", "        if False:",
      REAL + "test_numbers_where_text_belongs_fail_listing_them_or_are_a_counted_loss"),
    m("duplicate-column-first-wins", "two columns with the same name", "kmed/data.py",
      "        if len(at) > 1:", "        if False:",
      REAL + "test_two_columns_with_one_name_are_refused_and_a_number_picks_one[xlsx]",
      REAL + "test_two_columns_with_one_name_are_refused_and_a_number_picks_one[csv]"),
    m("blank-rows-a-loss", "an xlsx with 128 pairs and 200 formatted empty rows", "kmed/data.py",
      '(c["incomplete"] + c["non_text"] + c["eval_overlap"]) * self.per_row',
      '(c["blank"] + c["incomplete"] + c["non_text"] + c["eval_overlap"]) * self.per_row',
      REAL + "test_a_workbook_with_200_formatted_empty_rows_loses_nothing_and_reports_200_blank"),
    m("jsonl-blank-lines-not-counted", "an xlsx with 128 pairs and 200 formatted empty rows", "kmed/data.py",
      '            yield _Raw(label, "line", i, _NOTHING.get)  # a blank row', "            pass  # a blank row",
      REAL + "test_blank_rows_are_counted_alike_in_jsonl_and_eval_csv"),
    m("loss-contract-names-the-first-source-only", "several sources over the loss limit", "kmed/data.py",
      "            problems.append(loss.too_many()[:-1])", "            raise StageError(loss.too_many())",
      REAL + "test_every_source_over_the_loss_limit_is_named_in_one_error"),
    m("partly-null-record-stops-the-run", "several sources over the loss limit", "kmed/data.py",
      '            skipped.note("incomplete", f"', '            raise StageError(f"',
      REAL + "test_partly_null_records_are_a_counted_loss_naming_each_place"),
    m("header-row-ignored", "a title row above the header", "kmed/data.py",
      "                    if filled and (src.header_row is None or r == src.header_row):",
      "                    if filled:",
      REAL + "test_a_title_row_is_named_and_header_row_reads_past_it"),
    m("utf16-bom-not-detected", "UTF-16 CSVs", "kmed/data.py",
      "        if data.startswith(bom):", "        if False:",
      REAL + "test_utf16_csvs_cr_only_jsonl_and_decoder_messages"),
    m("cr-only-lines-not-split", "UTF-16 CSVs", "kmed/data.py",
      '        sep = "\\r"', '        sep = "\\n"',
      REAL + "test_utf16_csvs_cr_only_jsonl_and_decoder_messages"),
    Mutation("overlong-question-labelled-answer", "a question alone over `model.max_seq_length`", "kmed/data.py",
             (('    (or nothing at all, with both 0 aside).\n    """\n    if n_prompt >= max_len:\n',
               '    (or nothing at all, with both 0 aside).\n    """\n    if False:\n'),
              ('    "cot" (only its CoT is too long)."""\n    if n_prompt >= max_len:\n',
               '    "cot" (only its CoT is too long)."""\n    if False:\n')),
             ("tests/test_data.py::test_overlong_drop", "tests/test_data.py::test_overlong_truncate_shortens_only_the_cot")),
    m("empty-think-counts-as-reasoning", "a medical answer with an empty", "kmed/evaluation.py",
      "    reasoned = wellformed and think_tokens >= max(min_think_tokens, 1)", "    reasoned = wellformed",
      "tests/test_evaluation.py::test_an_empty_think_is_well_formed_but_not_reasoning"),
    m("masked-think-trained", "stage 2's records without a CoT under", "kmed/data.py",
      '        if cfg.think_for_non_reasoning == "masked" and r.task != "reasoning":', "        if False:",
      "tests/test_data.py::test_masked_empty_think_is_input_not_target"),
    m("replay-from-val", "stage-1 records replayed into stage 2", "kmed/data.py",
      '    pool = list({r["id"]: r for r in files["stage1/train.jsonl"]}.values())',
      '    pool = list({r["id"]: r for r in files["stage1/train.jsonl"] + files["stage1/val.jsonl"]}.values())',
      "tests/test_data.py::test_stage2_replay_draws_from_stage1_train_only"),
    # ---- security -----------------------------------------------------------------------------------
    m("checkpoint-pickles-unpickled", "marker-writing pickles planted", "stages/sft.py",
      'torch.load(ck / name, map_location="cpu", weights_only=True, mmap=True)',
      'torch.load(ck / name, map_location="cpu", weights_only=False, mmap=True)',
      SEC + "test_pickles_planted_in_checkpoints_are_never_unpickled"),
    m("pickle-weights-accepted", "pickle weights in the base folder", "kmed/modeling.py",
      "    if bad:\n        raise StageError(", "    if False:\n        raise StageError(",
      "tests/test_modeling.py::test_pickle_weights_refused_and_never_loaded",
      SEC + "test_pickle_weights_in_the_base_folder_are_refused_end_to_end"),
    m("auto-map-accepted", "custom model code in the base folder", "kmed/modeling.py",
      "    if auto_map:", "    if False:",
      "tests/test_modeling.py::test_custom_code_refused_unless_trusted",
      SEC + "test_remote_code_never_runs_unless_allow_listed"),
    m("remote-code-allow-list-ignored", "custom model code in the base folder", "kmed/config.py",
      "            if pinned not in self.trust_remote_code_allow:", "            if False:",
      SEC + "test_remote_code_never_runs_unless_allow_listed"),
    m("params-not-redacted", "canary `HF_TOKEN`", "kmed/tracking.py",
      "        out[k], found = redact(v, secrets)", "        out[k], found = v, []",
      SEC + "test_tokens_never_reach_mlflow_lock_params_logs_card_checkpoints_or_git",
      "tests/test_tracking.py::test_a_run_of_the_embedded_default_records_every_params_key_and_no_secret"),
    m("env-secrets-not-redacted", "canary `HF_TOKEN`", "kmed/tracking.py",
      "        if value in text:", "        if False:",
      "tests/test_tracking.py::test_a_run_of_the_embedded_default_records_every_params_key_and_no_secret"),
    m("artifacts-not-checked", "canary `HF_TOKEN`", "kmed/tracking.py",
      "        if self.enabled and _holds_secret(Path(path)):", "        if False:",
      "tests/test_tracking.py::test_a_run_of_the_embedded_default_records_every_params_key_and_no_secret"),
    m("template-split-refused", "chat templates: normal", "kmed/ggufio.py",
      '"rstrip", "split", "startswith"', '"rstrip", "startswith"',
      SEC + "test_normal_chat_templates_pass"),
    m("template-private-attr-allowed", "chat templates: non-template content", "kmed/ggufio.py",
      '        if node.attr.startswith("_"):', "        if False:",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("template-dunder-subscript-allowed", "chat templates: non-template content", "kmed/ggufio.py",
      '        if isinstance(node.arg, nodes.Const) and str(node.arg.value).startswith("_"):', "        if False:",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("template-filter-dunder-allowed", "chat templates: non-template content", "kmed/ggufio.py",
      '            if isinstance(c, str) and c.startswith("_"):', "            if False:",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("template-include-allowed", "chat templates: non-template content", "kmed/ggufio.py",
      "    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):",
      "    for node in ast.find_all(()):",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("template-any-call-allowed", "chat templates: non-template content", "kmed/ggufio.py",
      "        if name not in _ALLOWED_CALLS and name not in _ALLOWED_METHODS:", "        if False:",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("template-may-drop-the-message", "chat templates: non-template content", "kmed/ggufio.py",
      '    if "안녕하세요" not in out:', "    if False:",
      SEC + "test_chat_template_with_non_template_content_is_refused"),
    m("key-env-names-not-secret", "secrets in `*_KEY`, `*_API_KEY` and `*_KEY_ID` variables", "kmed/tracking.py",
      "|PASSPHRASE|(?:^|_)KEY(?:_ID)?$\"", "|PASSPHRASE\"",
      "tests/test_tracking.py::test_secrets_are_found_by_value_not_by_key_name",
      "tests/test_tracking.py::test_a_run_of_the_embedded_default_records_every_params_key_and_no_secret"),
    m("merged-template-not-written", "chat templates: the merged model's", "stages/merge.py",
      "    tok.chat_template = template\n", "",
      "tests/test_merge_template.py::test_merged_tokenizer_carries_the_training_prompt_template"),
    # ---- make serve (kmed/serve.py, issues 37 and 38) -------------------------------------------------
    m("serve-key-not-checked", "a request to `make serve` without the API key", "kmed/serve.py",
      '        if self.key is not None and not authorized(scope.get("headers", []), self.key):', "        if False:",
      SERVE + "test_with_a_key_a_request_without_it_is_401"),
    m("serve-no-key-beyond-loopback", "`make serve` bound beyond loopback without a key", "kmed/serve.py",
      "    if key is None and not is_loopback(host):", "    if False:",
      SERVE + "test_a_non_loopback_bind_without_a_key_refuses_to_start"),
    m("serve-default-bind-all-interfaces", "`make serve` with no `--host`", "kmed/serve.py",
      'ap.add_argument("--host", default="127.0.0.1",', 'ap.add_argument("--host", default="0.0.0.0",',
      SERVE + "test_default_bind_address_is_loopback"),
    m("serve-requests-unchecked", "a malformed request to `make serve`", "kmed/serve.py",
      "                check_request(path, body, self.later_system)", "                pass",
      SERVE + "test_bad_requests_get_a_400_in_openai_shape_with_nothing_internal"),
    m("serve-5xx-text-passed-on", "a failure inside `make serve`'s app", "kmed/serve.py",
      "        if status >= 500:\n            # llama-cpp-python", "        if False:\n            # llama-cpp-python",
      SERVE + "test_a_failure_inside_the_app_answers_a_generic_500"),
    m("serve-app-exception-unanswered", "a failure inside `make serve`'s app", "kmed/serve.py",
      '            log.exception("500 %s: unhandled error in the app", where)',
      '            raise',
      SERVE + "test_the_gate_answers_an_exception_in_the_app_with_a_generic_500"),
    m("serve-queue-unbounded", "more requests than `make serve` lets wait", "kmed/serve.py",
      "        if self.inside > self.max_queue:", "        if False:",
      SERVE_SOAK + "test_a_request_beyond_the_queue_gets_503_with_retry_after_at_once"),
    m("serve-decoding-defaults-dropped", "a request to `make serve` without sampling fields", "kmed/serve.py",
      "    return Gate(DecodingDefaults(app, request_defaults(dec)), key, max_queue, later_system)",
      "    return Gate(app, key, max_queue, later_system)",
      SERVE + "test_a_request_without_sampling_fields_gets_the_decoding_defaults"),
)


# ---------------------------------------------------------------------------------------------------
def tree_files(root: Path) -> list[str]:
    """The repo's files as git sees them: tracked, and untracked but not ignored (work not yet committed)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p})


def copy_tree(root: Path, dst: Path) -> None:
    for rel in tree_files(root):
        src = root / rel
        if not os.path.lexists(src):  # deleted in the working tree, not yet committed
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel, follow_symlinks=False)


def apply(mut: Mutation, tree: Path) -> None:
    path = tree / mut.file
    text = path.read_text(encoding="utf-8")
    for old, new in mut.edits:
        n = text.count(old)
        if n != 1:
            raise ValueError(f"{mut.name}: the text to replace occurs {n} times in {mut.file}, not once: {old!r}")
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")


@dataclass
class Outcome:
    status: str  # caught | survived | not run | error
    seconds: float
    detail: str


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float, stop_first: bool = True) -> Outcome:
    """The tests in `tree` (its code first on sys.path), in a process group killed on timeout."""
    junit = tree / ".mutation-junit.xml"
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *(["-x"] if stop_first else [])]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Outcome("error", time.monotonic() - t0, f"timed out after {timeout:.0f} s")
    secs = time.monotonic() - t0
    failed, errors, passed, skipped = [], [], [], []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = case.get("name", "")
            kinds = {child.tag for child in case}
            # An error (in a fixture's setup) is not the test noticing the mutation: reported, not counted.
            group = failed if "failure" in kinds else errors if "error" in kinds else skipped if "skipped" in kinds \
                else passed
            group.append(name)
    if failed and proc.returncode == 1:
        return Outcome("caught", secs, "failed: " + ", ".join(failed))
    if errors:
        return Outcome("error", secs, "error in setup: " + ", ".join(errors))
    if proc.returncode == 0 and passed:
        return Outcome("survived", secs, f"{len(passed)} passed" + (f", {len(skipped)} skipped" if skipped else ""))
    if proc.returncode == 0 and skipped:
        return Outcome("not run", secs, f"{len(skipped)} skipped")
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    return Outcome("error", secs, f"pytest exit {proc.returncode}: {tail[-300:]}")


def run_one(mut: Mutation | None, tests: tuple[str, ...], timeout: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="kmed-mutation-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(ROOT, tree)
        if mut is not None:
            apply(mut, tree)
        return run_tests(tree, tests, timeout, stop_first=mut is not None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="print the table and exit")
    ap.add_argument("--baseline", action="store_true", help="run the selected rows' tests on the unmutated tree")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutation (default 1800)")
    args = ap.parse_args()

    known = {mut.name for mut in MUTATIONS}
    unknown = [n for n in args.only if n not in known]
    if unknown:
        ap.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [mut for mut in MUTATIONS if not args.only or mut.name in args.only]
    width = max(len(mut.name) for mut in chosen)
    if args.list:
        for mut in chosen:
            print(f"{mut.name:{width}}  {mut.file:20}  {mut.row}  ->  {', '.join(mut.tests)}")
        return 0
    if args.baseline:
        tests = tuple(dict.fromkeys(t for mut in chosen for t in mut.tests))
        out = run_one(None, tests, args.timeout * 4)
        # Unmutated, every test must pass: "survived" is the good outcome here.
        verdict = {"survived": "pass", "caught": "FAIL"}.get(out.status, out.status)
        print(f"baseline: {verdict}  {out.seconds:.0f} s  {out.detail}")
        return 0 if out.status == "survived" else 1

    t_all = time.monotonic()
    results: list[tuple[Mutation, Outcome]] = []
    for mut in chosen:
        out = run_one(mut, mut.tests, args.timeout)
        results.append((mut, out))
        print(f"{out.status:8}  {mut.name:{width}}  {out.seconds:5.0f} s  {out.detail}", flush=True)
    caught = sum(out.status == "caught" for _, out in results)
    print(f"\n{caught}/{len(results)} caught in {(time.monotonic() - t_all) / 60:.1f} min")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
