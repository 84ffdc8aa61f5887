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


def test_show_draws_the_routing_picture(tmp_path, monkeypatch, capsys):
    import pytest

    # No Fashion-MNIST files here: the embedded default falls back to the synthetic picture.
    monkeypatch.setenv("ROUTED_FASHION_MNIST", str(tmp_path / "absent"))
    out = tmp_path / "routing.png"
    assert main(["show", "--size", "64", "--stage", "2", "--query", "1", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="outside the 7x7 region grid"):
        main(["show", "--size", "64", "--query", "7", "0", "--out", str(out)])


def test_train_and_eval_lm_are_wired(capsys):
    import pytest

    for argv in (["train", "--help"], ["eval", "lm", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_result_headers_carry_no_machine_folders(monkeypatch):
    """``command_line``: the device tool's output folder becomes ``$OUT``, other absolute paths their
    last part, relative paths and options stay."""
    from routed.env import command_line

    monkeypatch.setenv("OUT", "/srv/run7/out")
    line = command_line(["benchmarks/bra.py", "--out", "/srv/run7/out/bra/bra.json", "--data=/home/me/fm/x.idx",
                         "--sides", "224", "--label", "two words", "/srv/run7/out"])
    assert line == ("python benchmarks/bra.py --out $OUT/bra/bra.json --data=x.idx --sides 224 "
                    "--label 'two words' $OUT")
    monkeypatch.delenv("OUT")
    assert command_line(["/abs/benchmarks/moe.py", "--out", "/tmp/moe.json"]) == "python moe.py --out moe.json"
