"""The benchmark runs end to end (tiny models here; real sizes are for `mergekit-lite bench`)."""

import argparse

from mergekit_lite.bench import add_arguments, run_bench


def test_bench_reports_every_scenario(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--dir", str(tmp_path), "--size-gb", "0.004", "--hidden", "64", "--vocab", "512",
                         "--methods", "linear,ties", "--multistep", "--upscale", "--mergekit", ""])
    args.mergekit = None
    report = run_bench(args)
    scenarios = [(r["scenario"], r["tool"]) for r in report["rows"]]
    assert [s for s, _ in scenarios].count("3-step recipe 0.004GB") >= 2
    assert any(s.startswith("linear") for s, _ in scenarios) and any(s.startswith("ties") for s, _ in scenarios)
    assert any(s.startswith("upscale") for s, _ in scenarios)
    for r in report["rows"]:
        assert r["seconds"] > 0 and r["gb_per_s"] > 0 and r["peak_rss_over_baseline"] >= 0
    assert "mergekit-lite is" in report["text"] and report["largest_tensor_f32"] == 4 * 512 * 64


def test_bench_compares_another_checkout_side_by_side(tmp_path):
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--dir", str(tmp_path), "--size-gb", "0.004", "--hidden", "64", "--vocab", "512",
                         "--methods", "linear", "--compare", repo])
    args.mergekit = None
    report = run_bench(args)
    tools = [r["tool"] for r in report["rows"]]
    assert tools == ["mergekit-lite", f"mergekit-lite ({os.path.basename(repo)})"]
    assert [r["versus"] for r in report["ratios"]] == [tools[1]] and report["ratios"][0]["speedup"] > 0
