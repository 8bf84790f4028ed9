"""`terraformer bench attention`: the cell loop (batch halving, skipping), the table, the
records file and its plot, the command line, and one real cell end to end (slow)."""

import json

import pytest

from terraformer import bench, bench_attention
from terraformer.bench_attention import markdown_table, plot_attention, read_records, run_table
from terraformer.layers.attention_types import ATTENTION_TYPES


def _fake_runner(fits):
    """A cell runner that 'fits' when fits(mechanism, seq_len, batch), else reports OOM;
    speed: 1000 / (seq_len * cost) sequences per second."""
    calls = []

    def run(mechanism, seq_len, batch, steps, **_):
        calls.append((mechanism, seq_len, batch))
        if not fits(mechanism, seq_len, batch):
            return dict(mechanism=mechanism, seq_len=seq_len, batch=batch, status="oom")
        cost = {"full": 2.0, "lsh": 1.0}[mechanism]
        seq_s = 1000.0 * 1024 / (seq_len * cost)
        return dict(mechanism=mechanism, seq_len=seq_len, batch=batch, status="ok",
                    steps_per_s=seq_s / batch, sequences_per_s=seq_s,
                    peak_memory_gib=seq_len / 1024 * cost)

    return run, calls


def test_batch_halves_beyond_4k_and_longer_lengths_are_skipped():
    # full: batch 8 up to 4K, batch 2 at 16K, nothing at 64K; lsh: everything at batch 8.
    run, calls = _fake_runner(lambda m, n, b: m == "lsh" or n <= 4096 or (n == 16384 and b <= 2))
    lines = []
    records = run_table(["full", "lsh"], [65536, 1024, 16384, 4096, 131072], 8, 1,
                        log=lines.append, cell_runner=run)
    assert [json.loads(line) for line in lines] == records
    full = {r["seq_len"]: r for r in records if r["mechanism"] == "full"}
    assert [n for n in full] == [1024, 4096, 16384, 65536, 131072]   # increasing lengths
    assert full[16384]["status"] == "ok" and full[16384]["batch"] == 2
    assert full[65536]["status"] == "oom" and full[131072]["status"] == "skipped"
    # 16K tried 8, 4, 2; 64K started from the batch that fitted 16K (2), then 1.
    assert [(n, b) for m, n, b in calls if m == "full" and n > 4096] == [
        (16384, 8), (16384, 4), (16384, 2), (65536, 2), (65536, 1)]
    assert all(r["status"] == "ok" and r["batch"] == 8
               for r in records if r["mechanism"] == "lsh")


def test_no_halving_up_to_4k():
    run, calls = _fake_runner(lambda m, n, b: b <= 2)
    records = run_table(["lsh"], [2048, 4096], 8, 1, log=lambda _: None, cell_runner=run)
    assert [r["status"] for r in records] == ["oom", "skipped"]
    assert calls == [("lsh", 2048, 8)]


def test_table_has_speed_ups_memory_and_failures():
    run, _ = _fake_runner(lambda m, n, b: m == "lsh" or n <= 4096 or b <= 2)
    records = run_table(["full", "lsh"], [1024, 16384], 8, 1, log=lambda _: None,
                        cell_runner=run)
    records.append(dict(mechanism="broken", seq_len=1024, batch=8, status="error",
                        error="ValueError: no"))
    table = markdown_table(records, 8).splitlines()
    assert table[0] == ("| mechanism | steps/s 1K | steps/s 16K | peak GiB 1K | peak GiB 16K |")
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) == {"full", "lsh", "broken"}
    # lsh runs twice the sequences per second of full: (2.00x), at 16K against full at b2.
    assert "(2.00x)" in rows["lsh"].split(" | ")[1] and "(2.00x)" in rows["lsh"].split(" | ")[2]
    assert rows["full"].split(" | ")[2].endswith("b2")        # run at a smaller batch
    assert "x)" not in rows["full"]                             # the baseline has no ratio
    assert rows["lsh"].split(" | ")[3] == "1.00"                # peak GiB at 1K
    assert rows["broken"].split(" | ")[1] == "error"


def test_records_file_and_plot(tmp_path):
    run, _ = _fake_runner(lambda m, n, b: True)
    records = run_table(["full", "lsh"], [1024, 2048, 4096], 8, 1, log=lambda _: None,
                        cell_runner=run)
    path = tmp_path / "attention.txt"
    # A saved console output: records, a blank line, the table.
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n"
                    + markdown_table(records) + "\n")
    assert read_records(path) == records
    png = plot_attention(path)
    assert png == tmp_path / "attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_failing_cell_is_a_record(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(bench_attention, "run_cell", boom)
    assert bench_attention._cell_main(["--mechanism", "full", "--seq_len", "64", "--batch",
                                       "2", "--steps", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["status"] == "oom" and record["seq_len"] == 64 and "RESOURCE" in record["error"]


def test_command_line_takes_every_registered_name():
    parser = bench.build_parser()
    args = parser.parse_args(["attention", "--lengths", "1024,2048", "--mechanisms",
                              ",".join(ATTENTION_TYPES), "--batch", "4"])
    assert args.lengths == [1024, 2048] and args.mechanisms == list(ATTENTION_TYPES)
    for name in ATTENTION_TYPES:
        assert parser.parse_args(["train", "--attention", name]).attention == name
    for bad in (["attention", "--mechanisms", "full,nonesuch"], ["attention", "--lengths", "0"],
                ["train", "--attention", "nonesuch"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(bad)
        assert e.value.code == 2


@pytest.mark.slow
def test_one_real_cell_end_to_end(tmp_path, capsys):
    """A real cell (a subprocess, the full classifier) at a tiny length, through the command
    line, then plotted."""
    out = tmp_path / "cells.jsonl"
    # A generous --timeout: a fresh process compiling the 4-layer model's step takes minutes
    # on a busy 2-core machine.
    assert bench.main(["attention", "--lengths", "64", "--mechanisms", "local",
                       "--batch", "2", "--steps", "1", "--timeout", "3000",
                       "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    records = read_records(out)
    assert [r["mechanism"] for r in records] == ["local"]
    for r in records:
        assert r["status"] == "ok", r
        assert r["steps_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["batch"] == 2
        assert r["params"] > 2_000_000 and r["loss"] > 0
    assert "| mechanism | steps/s 64 | peak GiB 64 |" in printed
    assert plot_attention(out).is_file()
