"""The sft stage on a tiny Qwen2 built from a config: masking, loss, packing, resume, guards, stage 2."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmed.lm import IGNORE, encode_record, encode_records
from tests.stagekit import read_json, run_stage, stage_env, tiny_records, write_params, write_split

FAST = {"train.max_steps": 12, "train.save_steps": 4, "train.learning_rate": 2e-3, "train.warmup_steps": 1,
        "mlflow.enabled": False, "model.max_seq_length": 128}


def test_auto_packing_is_padding_free_only_with_a_varlen_kernel() -> None:
    from kmed.fastattn import unsloth_packed_kernel
    from stages.sft import packing_mode

    assert packing_mode("auto", fast_varlen=True) == (False, True)  # padding-free: exact, seed's samples/step
    assert packing_mode("auto", fast_varlen=False) == (False, False)  # padded
    for setting, want in (("none", (False, False)), ("padding_free", (False, True)), ("bfd", (True, True))):
        assert packing_mode(setting, True) == packing_mode(setting, False) == want
    # This machine has no unsloth (CUDA only), so no varlen kernel: the CPU default stays padded.
    assert importlib.util.find_spec("unsloth") is None and not unsloth_packed_kernel()


def test_labels_are_masked_exactly_on_the_prompt(smol_tokenizer) -> None:  # noqa: ANN001
    row = tiny_records(1)[0]
    enc = encode_record(smol_tokenizer, row["prompt"], row["completion"], 512)
    n_prompt = len(smol_tokenizer(row["prompt"])["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert all(x != IGNORE for x in enc["labels"][n_prompt:])
    assert enc["input_ids"][-1] == smol_tokenizer.eos_token_id  # EOS is trained
    assert encode_records(smol_tokenizer, [row], 512) == [enc]


def _tiny_batch(tok, n: int = 3):  # noqa: ANN001, ANN202
    enc = encode_records(tok, tiny_records(n), 128)
    return enc


def test_selective_head_loss_equals_the_models_loss(tiny_model_dir: Path, smol_tokenizer) -> None:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    from kmed.lm import padded_batches
    from stages.sft import selective_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = next(padded_batches(_tiny_batch(smol_tokenizer), 3, smol_tokenizer.pad_token_id))
    ref = model(**batch).loss
    ours = selective_lm_loss(model, batch)
    assert torch.allclose(ref, ours, atol=1e-5), (ref.item(), ours.item())


def test_padding_free_batch_gives_the_same_per_sample_loss(tiny_model_dir: Path, smol_tokenizer) -> None:  # noqa: ANN001
    """No attention or position leakage across samples flattened into one row."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    enc = _tiny_batch(smol_tokenizer, 3)
    pad_id = smol_tokenizer.pad_token_id

    def per_sample(batch: dict, lengths: list[int], flat: bool) -> list[float]:
        with torch.no_grad():
            # use_cache=False as in training: with a cache, transformers skips packed-sequence masking.
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
        out, offset = [], 0
        for i, n in enumerate(lengths):
            lg = logits[0, offset:offset + n] if flat else logits[i, :n]
            lab = batch["labels"][0, offset:offset + n] if flat else batch["labels"][i, :n]
            out.append(torch.nn.functional.cross_entropy(lg[:-1], lab[1:], ignore_index=IGNORE).item())
            offset += n
        return out

    lengths = [len(e["input_ids"]) for e in enc]
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id)(enc)
    flat = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(enc)
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    a, b = per_sample(padded, lengths, False), per_sample(flat, lengths, True)
    assert a == pytest.approx(b, abs=1e-4)


def _workdir(tmp_path: Path, tiny_model_dir: Path, **overrides) -> Path:  # noqa: ANN003
    wd = tmp_path / "wd"
    (wd / "models").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, wd / "models" / "base")
    rows = tiny_records(40)
    write_split(wd, "stage1", rows[:32], rows[32:])
    write_split(wd, "stage2", rows[8:40], rows[:8])
    write_params(wd, **{**FAST, **overrides})
    return wd


def _lora_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.mark.integration
def test_stage_trains_lora_only_and_loss_falls(tmp_path: Path, tiny_model_dir: Path) -> None:
    wd = _workdir(tmp_path, tiny_model_dir)
    base_bytes = (wd / "models/base/model.safetensors").read_bytes()
    proc = run_stage(wd, "stages.sft", "stage1")
    assert "trainable params:" in proc.stderr
    m = read_json(wd / "metrics/sft-stage1.json")
    assert m["steps"] == 12 and m["train_loss_final"] < m["train_loss_first"]
    assert m["val_loss_final"] < m["val_loss_start"]
    assert m["tokens_seen"] > 0 and m["tokens_per_s"] > 0
    assert m["peak_mem_gib"] > 0  # read at the end of training too, whatever train.logging_steps logged
    curve = (wd / "metrics/sft-stage1-curve.tsv").read_text().splitlines()
    assert curve[0].startswith("step\tloss") and len(curve) == 13
    lora = _lora_tensors(wd / "models/stage1/adapter")
    assert lora and all("lora_" in k for k in lora)
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b)  # B starts at zero: every adapter was trained
    modules = {k.split(".")[-3] for k in lora}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (wd / "models/base/model.safetensors").read_bytes() == base_bytes  # frozen base untouched
    assert not list((wd / "models/stage1").glob(".adapter.tmp-*"))
    lineage = read_json(wd / "models/stage1/adapter/lineage.json")
    assert lineage["seed"] == 3407 and lineage["params"]["lora"]["r"] == 16


@pytest.mark.integration
def test_same_seed_same_first_losses(tmp_path: Path, tiny_model_dir: Path) -> None:
    curves = []
    for i in range(2):
        wd = _workdir(tmp_path / str(i), tiny_model_dir, **{"train.max_steps": 3})
        run_stage(wd, "stages.sft", "stage1")
        curves.append([line.split("\t")[1] for line in (wd / "metrics/sft-stage1-curve.tsv").read_text().splitlines()[1:]])
    assert curves[0] == curves[1]


@pytest.mark.integration
def test_kill_then_rerun_resumes_and_skips_a_truncated_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 40, "train.save_steps": 2,
                                               "train.save_total_limit": 10})
    ck = wd / "models/checkpoints/stage1"
    proc = subprocess.Popen([sys.executable, "-m", "stages.sft", "stage1"], cwd=wd, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (ck / "checkpoint-6" / "trainer_state.json").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (wd / "models/stage1/adapter").exists()  # nothing promoted by a killed run
    # The kill can land mid-save and leave the newest directory without its adapter yet (CI saw checkpoint-18
    # so); the rerun must skip such a directory too, so count only those with an adapter here.
    done = sorted(int(p.name.split("-")[1]) for p in ck.glob("checkpoint-*")
                  if (p / "adapter_model.safetensors").exists())
    assert len(done) >= 3, done
    newest = ck / f"checkpoint-{done[-1]}"
    # Truncate the newest adapter: the rerun must skip that checkpoint (and any half-written newer one) and
    # take the one before.
    f = newest / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rerun = run_stage(wd, "stages.sft", "stage1")
    assert f"skipping incomplete checkpoint {newest.relative_to(wd)}" in rerun.stderr
    m = read_json(wd / "metrics/sft-stage1.json")
    assert m["resumed_from_step"] == done[-2] and m["steps"] == 40
    assert (wd / "models/stage1/adapter/adapter_model.safetensors").exists()


@pytest.mark.integration
def test_checkpoints_of_another_config_are_not_resumed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Another learning rate: the old checkpoints would load without complaint (a LoRA rank change would
    crash on their shapes, hiding a missing check), so only the fingerprint keeps the rerun from promoting
    the finished checkpoint of the other config untrained."""
    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 4, "train.save_steps": 2})
    run_stage(wd, "stages.sft", "stage1")
    write_params(wd, **{**FAST, "train.max_steps": 4, "train.save_steps": 2, "train.learning_rate": 1e-3})
    proc = run_stage(wd, "stages.sft", "stage1")
    assert "belong to another config or code version; starting fresh" in proc.stderr
    m = read_json(wd / "metrics/sft-stage1.json")
    assert m["resumed_from_step"] == 0 and m["steps"] == 4


@pytest.mark.integration
def test_nan_loss_stops_fast_and_promotes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 30})
    w = wd / "models/base/model.safetensors"
    sd = load_file(str(w))
    key = next(k for k in sd if k.endswith("norm.weight"))
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(w), metadata={"format": "pt"})
    t0 = time.time()
    proc = run_stage(wd, "stages.sft", "stage1", check=False)
    assert proc.returncode == 2
    assert "loss became non-finite at step 2; no adapter was promoted" in proc.stderr
    assert not (wd / "models/stage1/adapter").exists()
    assert not (wd / "metrics/sft-stage1.json").exists()
    assert time.time() - t0 < 120


@pytest.mark.integration
@pytest.mark.parametrize("init", ["merge_then_new_adapter", "continue_adapter"])
def test_stage2_init_modes(tmp_path: Path, tiny_model_dir: Path, init: str) -> None:
    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 6, "sft_stage2.init": init})
    run_stage(wd, "stages.sft", "stage1")
    run_stage(wd, "stages.merge", "stage1")
    write_params(wd, **{**FAST, "train.max_steps": 1, "train.learning_rate": 1e-5, "sft_stage2.init": init})
    proc = run_stage(wd, "stages.sft", "stage2")
    b1 = {k: v for k, v in _lora_tensors(wd / "models/stage1/adapter").items() if "lora_B" in k}
    b2 = {k: v for k, v in _lora_tensors(wd / "models/stage2/adapter").items() if "lora_B" in k}
    drift = sum((b2[k] - b1[k]).norm() for k in b1) / sum(b1[k].norm() for k in b1)
    lineage = read_json(wd / "models/stage2/adapter/lineage.json")
    if init == "continue_adapter":
        assert drift < 0.05  # one tiny step on top of the stage-1 adapter
        assert lineage["notes"]["continued_from"] == "models/stage1/adapter"
        assert lineage["start"] == "models/base"
    else:
        assert drift > 0.9  # a fresh adapter (B starts at zero) on the stage-1 merged weights
        assert lineage["start"] == "models/stage1/merged"
    assert "start=models/" in proc.stderr


@pytest.mark.integration
def test_stage_under_accelerate_launch_ddp(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two processes (gloo on CPU; NCCL on GPUs is the same code path): one adapter saved by rank 0,
    tokens counted over both ranks, one metrics file."""
    single = _workdir(tmp_path / "one", tiny_model_dir, **{"train.max_steps": 4})
    run_stage(single, "stages.sft", "stage1")
    wd = _workdir(tmp_path / "two", tiny_model_dir, **{"train.max_steps": 4})
    # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK as `accelerate launch --num_processes 2` does on GPUs
    # (accelerate's --cpu launcher runs a single process).
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "-m", "stages.sft", "stage1"],
                          cwd=wd, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_json(single / "metrics/sft-stage1.json"), read_json(wd / "metrics/sft-stage1.json")
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["steps"] == one["steps"] == 4
    # Each rank takes its own batches: twice the samples per optimizer step, counted over both ranks.
    assert 1.6 < two["tokens_seen"] / one["tokens_seen"] < 2.4
    # Loss on the single-process scale (labels are counted over both ranks; DDP averages gradients).
    assert abs(two["train_loss_first"] - one["train_loss_first"]) < 0.5
    lora = _lora_tensors(wd / "models/stage1/adapter")
    assert any(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k)  # trained (B starts at 0)
    assert proc.stderr.count("sft-stage1 done:") == 1  # rank 1 returns before saving and recording


def _complete_checkpoint(ck: Path, step: int) -> None:
    """What checkpoint_complete accepts: trainer state, whole adapter weights, optimizer and scheduler."""
    import json

    import torch
    from safetensors.torch import save_file

    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"lora_A": torch.zeros(2, 2)}, str(ck / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({"state": torch.zeros(2)}, ck / name)


def test_checkpoint_fingerprint_covers_the_training_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A finished checkpoint from older code is not promoted when `dvc repro` reruns for a code change: the
    fingerprint hashes the code, and a complete checkpoint stamped with another one is refused by that check
    (its own message, the folder removed), not resumed."""
    import importlib.util
    import logging

    from kmed.config import load_params

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "stages").mkdir()
    shutil.copy(root / "stages/sft.py", tmp_path / "stages/sft.py")
    shutil.copytree(root / "kmed", tmp_path / "kmed", ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("sft_copy", tmp_path / "stages/sft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "q", "completion": "a"}\n', encoding="utf-8")
    params = load_params(root / "params.yaml")
    fp = mod.fingerprint("stage1", params, [data], tmp_path)
    assert mod.fingerprint("stage1", params, [data], tmp_path) == fp
    with open(tmp_path / "kmed/lm.py", "a", encoding="utf-8") as f:
        f.write("\n# changed\n")
    fp_lib = mod.fingerprint("stage1", params, [data], tmp_path)
    with open(tmp_path / "stages/sft.py", "a", encoding="utf-8") as f:
        f.write("\n# changed\n")
    fp_sft = mod.fingerprint("stage1", params, [data], tmp_path)
    assert len({fp, fp_lib, fp_sft}) == 3

    ckdir = tmp_path / "models/checkpoints/stage1"
    _complete_checkpoint(ckdir / "checkpoint-2", 2)
    (ckdir / "FINGERPRINT").write_text(fp + "\n")
    assert mod.newest_complete_checkpoint(ckdir, fp) == ckdir / "checkpoint-2"  # complete: resumable as is
    with caplog.at_level(logging.INFO):
        assert mod.newest_complete_checkpoint(ckdir, fp_sft) is None
    assert f"checkpoints in {ckdir} belong to another config or code version; starting fresh" in caplog.text
    assert not ckdir.exists()


@pytest.mark.integration
def test_stage2_new_adapter_on_stage1_starts_where_stage1_ended(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Issue 34: stage 1's LoRA is the frozen ranks [0, r) of stage 2's; the new ranks train; the start is stage 1's
    model (stage1_retained 1); merge@stage2 folds both into the base."""
    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 6, "sft_stage2.init": "new_adapter_on_stage1"})
    run_stage(wd, "stages.sft", "stage1")
    s1 = read_json(wd / "metrics/sft-stage1.json")
    assert s1["val_loss_start"] - s1["val_loss_final"] > 0.05  # a gain worth keeping
    write_params(wd, **{**FAST, "train.max_steps": 3, "sft_stage2.init": "new_adapter_on_stage1"})
    proc = run_stage(wd, "stages.sft", "stage2")
    m = read_json(wd / "metrics/sft-stage2.json")
    assert m["stage1_val_loss_at_start"] == pytest.approx(s1["val_loss_final"], abs=1e-4)
    assert m["stage1_retained"] == pytest.approx(1.0, abs=2e-3)
    assert "of its gain kept" in proc.stderr
    one, two = _lora_tensors(wd / "models/stage1/adapter"), _lora_tensors(wd / "models/stage2/adapter")
    assert set(one) == set(two)
    cfg = read_json(wd / "models/stage2/adapter/adapter_config.json")
    assert (cfg["r"], cfg["lora_alpha"]) == (32, 32)  # scaling alpha/r unchanged: 16/16 == 32/32
    trained = 0.0
    for k, a in one.items():
        b = two[k]
        if ".lora_A." in k:
            assert b.shape == (32, a.shape[1]) and torch_equal(b[:16], a)  # frozen: bit for bit stage 1's
            trained += float(b[16:].abs().sum() > 0)  # new A ranks: random init, then trained
        else:
            assert b.shape == (a.shape[0], 32) and torch_equal(b[:, :16], a)
            trained += float(b[:, 16:].abs().sum() > 0)  # new B ranks start at zero: non-zero = trained
    assert trained == len(one)
    lineage = read_json(wd / "models/stage2/adapter/lineage.json")
    assert lineage["start"] == "models/base" and "frozen" in lineage["notes"]["stacked_on"]
    run_stage(wd, "stages.merge", "stage2")  # its probe checks every merged module against base + the rank-32 LoRA
    assert read_json(wd / "metrics/merge-stage2.json")["probe_max_rel_err"] < 0.01


@pytest.mark.integration
def test_stage2_that_starts_without_stage1_fails_before_training(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A start that lost stage 1 (here: the bare base) fails with one sentence naming the init and the fix."""
    wd = _workdir(tmp_path, tiny_model_dir, **{"train.max_steps": 6})
    run_stage(wd, "stages.sft", "stage1")
    write_params(wd, **{**FAST, "train.max_steps": 2, "sft_stage2.init": "base"})
    proc = run_stage(wd, "stages.sft", "stage2", check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(err) == 1 and "kept" in err[0] and "sft_stage2.min_stage1_retained=0.9" in err[0]
    assert "new_adapter_on_stage1" in err[0] and "Traceback" not in proc.stderr
    assert not (wd / "models/stage2/adapter").exists() and not (wd / "metrics/sft-stage2.json").exists()
    assert not (wd / "models/checkpoints/stage2").exists() or not list((wd / "models/checkpoints/stage2").glob("checkpoint-*"))


def torch_equal(a, b) -> bool:  # noqa: ANN001
    import torch

    return bool(torch.equal(a.float(), b.float()))
