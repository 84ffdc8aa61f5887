"""The command line runs and writes what it says it writes."""

import json

from routed.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["cpu"]["reference"] == "ok"
    assert data["machine"]["torch"]


def test_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--seq-len", "256", "300", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                 "--block-size", "32", "--density", "0.3", "--repeats", "2", "--no-progress", "--backward",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["config"]["backward"] is True
    assert [r["seq_len"] for r in data["results"]] == [256, 300]
    for r in data["results"]:
        assert r["dense_ms"] > 0 and r["routed_ms"] > 0
        assert 0.2 < r["density"] < 0.4
    assert "speedup" in capsys.readouterr().out
