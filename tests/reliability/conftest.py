"""Fixtures of the reliability suite: tiny models, trained/pipeline workdirs, a loopback S3 server.

The expensive states (a trained sft workdir, a git+dvc repo after one good `dvc repro preprocess`)
are built once per session; tests copy them or restore them afterwards.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability import kit
from tests.stagekit import moto_s3_server, tiny_records, write_params, write_split

SFT_FAST = {
    "train.max_steps": 6,
    "train.save_steps": 2,
    "train.save_total_limit": 10,
    "train.learning_rate": 2e-3,
    "train.warmup_steps": 1,
    "mlflow.enabled": False,
    "model.max_seq_length": 128,
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_dvc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the user's DVC global/system config and site cache out of the temp repos."""
    d = tmp_path_factory.mktemp("dvc_home")
    kit.ISOLATE.update(
        {
            "DVC_GLOBAL_CONFIG_DIR": str(d / "global"),
            "DVC_SYSTEM_CONFIG_DIR": str(d / "system"),
            "DVC_SITE_CACHE_DIR": str(d / "site"),
        }
    )
    yield
    kit.ISOLATE.clear()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer) -> Path:  # noqa: ANN001
    """A 2-layer Llama (SmolLM2's architecture, so llama.cpp's converter knows its tokenizer) with the
    SmolLM2 tokenizer saved as-is, and its final norm zeroed: every logit is 0, so greedy decoding
    picks token 0 (`<|endoftext|>`, an end-of-generation token for llama.cpp) in HF and in every
    GGUF alike, and the export stage's parity checks pass on random weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = smol_tokenizer
    tok.save_pretrained(
        out
    )  # first: saved next to a config.json it would be re-typed as that model's tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_sft_workdir(wd: Path, base: Path, **overrides: object) -> Path:
    """models/base + tiny rendered splits + FAST params: what the sft stage needs, nothing else."""
    (wd / "models").mkdir(parents=True)
    shutil.copytree(base, wd / "models" / "base")
    rows = tiny_records(40)
    write_split(wd, "stage1", rows[:32], rows[32:])
    write_split(wd, "stage2", rows[8:40], rows[:8])
    write_params(wd, **{**SFT_FAST, **overrides})
    return wd


@pytest.fixture(scope="session")
def sft_trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A workdir after one complete sft-stage1 run: adapter, metrics, checkpoints 2, 4 and 6 (copy it)."""
    wd = make_sft_workdir(tmp_path_factory.mktemp("sft_trained") / "wd", tiny_model_dir)
    kit.stage(wd, "stages.sft", "stage1")
    assert sorted(p.name for p in (wd / "models/checkpoints/stage1").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    return wd


@pytest.fixture
def sft_copy(sft_trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "wd"
    shutil.copytree(sft_trained, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------------------------
# A git+dvc repo with the real pipeline, after one good `dvc repro -s preprocess`
# ---------------------------------------------------------------------------------------------
class PipelineRepo:
    """The committed pipeline (dvc.yaml, params, kmed/, stages/, sample data) with a tiny base model."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def dvc(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        return kit.dvc(self.path, *args, check=check, **env)

    def repro(self, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        # -s: preprocess alone (models/base is given, not rebuilt by prepare-base).
        return self.dvc("repro", "-s", "preprocess", check=check, **env)

    def outputs(self) -> dict[str, str]:
        """Digest of everything preprocess has produced (data, reports, metrics) and of dvc.lock."""
        p = self.path
        return kit.digest(p / "data/processed", p / "reports", p / "metrics", p / "dvc.lock")

    def params(self, **overrides: object) -> None:
        import yaml

        raw = yaml.safe_load((self.path / "params.yaml").read_text())
        for dotted, value in overrides.items():
            node = raw
            *path, last = dotted.split(".")
            for k in path:
                node = node[k]
            node[last] = value
        (self.path / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))

    def reset(self) -> None:
        """Back to the committed state: tracked files, no untracked ones, outputs checked out."""
        for pat in (".processed.tmp-*", ".processed.old-*"):
            for p in (self.path / "data").glob(pat):
                shutil.rmtree(p, ignore_errors=True)
        kit.git(self.path, "checkout", "-q", "--", ".")
        kit.git(self.path, "clean", "-fdq")
        self.dvc("checkout", "-f", "-q", "preprocess")


@pytest.fixture(scope="session")
def pipeline_repo_session(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> PipelineRepo:
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    kit.copy_pipeline(path, tiny_llama_dir)
    kit.init_git_dvc(path, ignore="/models/\n")  # models/base is prepare-base's output, given here
    repo = PipelineRepo(path)
    repo.repro()
    kit.git(path, "add", "-A")
    kit.git(path, "commit", "-qm", "preprocess")
    repo.committed = repo.outputs()  # type: ignore[attr-defined]
    return repo


@pytest.fixture
def pipeline_repo(pipeline_repo_session: PipelineRepo) -> Iterator[PipelineRepo]:
    """The session repo, checked to be at its committed state before the test and put back after it."""
    repo = pipeline_repo_session
    assert repo.outputs() == repo.committed, "an earlier test left the pipeline repo changed"  # type: ignore[attr-defined]
    yield repo
    repo.reset()
    assert repo.outputs() == repo.committed  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# A loopback S3 server (moto) and a toy git+dvc repo
# ---------------------------------------------------------------------------------------------
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port; always stopped."""
    with moto_s3_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


GEN_PY = '''"""Toy stage: python gen.py N  (N files of 4 KiB under out/, plus model.bin)"""
import pathlib, random, sys
n, r = int(sys.argv[1]), random.Random(sys.argv[1])
d = pathlib.Path("out")
d.mkdir(exist_ok=True)
for i in range(n):
    (d / f"part-{i:04d}.bin").write_bytes(r.randbytes(4096))
pathlib.Path("model.bin").write_bytes(r.randbytes(100_000))
'''


def make_toy_repo(path: Path, n_files: int = 20, params: bool = False) -> Path:
    """A git+dvc repo with one stage `gen` (a directory output and a file output), reproduced and committed.
    With params=True the file count is the param `n` (for experiments)."""
    path.mkdir(parents=True)
    (path / "gen.py").write_text(GEN_PY)
    if params:
        (path / "params.yaml").write_text(f"n: {n_files}\n")
        (path / "dvc.yaml").write_text(
            "stages:\n  gen:\n    cmd: python gen.py ${n}\n    deps: [gen.py]\n"
            "    params: [n]\n    outs: [out, model.bin]\n"
        )
    else:
        (path / "dvc.yaml").write_text(
            f"stages:\n  gen:\n    cmd: python gen.py {n_files}\n    deps: [gen.py]\n"
            "    outs: [out, model.bin]\n"
        )
    kit.init_git_dvc(path)
    kit.dvc(path, "repro", "-q")
    kit.git(path, "add", "-A")
    kit.git(path, "commit", "-qm", "gen")
    return path
