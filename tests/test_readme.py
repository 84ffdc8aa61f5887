"""Every Python example in the README runs as written."""

import re
from pathlib import Path


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (pictures)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3, "README lost its python examples (attention, experts, vision)"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        if "routed_attention(" in code:  # the attention example's output has SDPA's shape
            assert namespace["out"].shape == (1, 8, 1000, 64)
