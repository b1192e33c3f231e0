"""The README's examples run (issue 19): every Python block of its "Use" section, in order, as
written; the `tarp-fast` commands of its "Commands" block, at a tiny size."""

from __future__ import annotations

import os
import re
import shlex
import warnings

import pytest
import torch
from models import write_letter_corpus

from tarp_fast.cli import main

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TINY = {"prepare": ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps", "3",
                    "--meta-steps", "2", "--tasks-per-batch", "2", "--steps", "3", "--seq-len", "16",
                    "--batch-size", "2"],
        "adapt": ["--steps", "2"], "generate": ["--max-new-tokens", "4"], "eval": ["--eval-windows", "2"],
        "bench-adapt": ["--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--rank", "2", "--pretrain-steps",
                        "3", "--meta-steps", "2", "--tasks-per-batch", "2", "--steps", "3", "--seq-len", "16",
                        "--batch-size", "2", "--seeds", "0", "--arms", "direct,tarp"],
        "config": []}


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = re.search(r"\n## ", text[start + len(heading) + 2:])
    return text[start:start + len(heading) + 2 + end.start()] if end else text[start:]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_use_section_python_blocks_run(tmp_path, monkeypatch):
    """Before: the Use section showed no load_adapter, Trainer, generate, merge or multi-task example,
    and its one block did not run (``...`` in place of training)."""
    use = _section(open(README, encoding="utf-8").read(), "## Use")
    blocks = _blocks(use, "python")
    joined = "\n".join(blocks)
    for api in ("load_adapter", "Trainer(", ".generate(", "merge_and_unload", "tarp_context(task_index"):
        assert api in joined, api
    assert "DESIGN" not in use
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=__import__("tarp_fast").patch.PatchedSaveWarning)
        for block in blocks:
            exec(compile(block, "README.md:Use", "exec"), ns)
    # what the blocks claim
    assert ns["out"].shape == (4, 16) and ns["y"].shape == (6, 8)
    assert type(ns["plain"]).__name__ == "GPT2LMHeadModel" and not any(
        "tarp_" in k for k in ns["plain"].state_dict())
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()


@pytest.fixture
def corpus_dir(tmp_path):
    return write_letter_corpus(tmp_path / "corpus", names=("news", "code", "mail", "wiki"))


def test_commands_block_runs(corpus_dir, tmp_path, monkeypatch, capsys):
    """The `tarp-fast` commands the README shows exist with those flags and run in that order."""
    monkeypatch.setenv("TARP_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    text = open(README, encoding="utf-8").read()
    block = next(b for b in _blocks(text, "bash") if "tarp-fast prepare" in b and "tarp-fast generate" in b)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("tarp-fast ")]
    assert [c[1] for c in commands] == ["prepare", "adapt", "generate", "eval", "bench-adapt", "config"]
    for argv in commands:
        argv = [corpus_dir if a == "DIR" else a for a in argv[1:]]
        assert main([*argv, *TINY[argv[0]], *(["--threads", "1"] if argv[0] != "config" else [])]) == 0, argv
    out = capsys.readouterr().out
    assert "The " in out and "held-out loss" in out and "[prep]" in out
