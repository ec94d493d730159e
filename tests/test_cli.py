"""The command line: info, check, bench (CPU mode) and the benchmark harness' outputs."""
import json
import os

import torch

from fastlayers import cli
from fastlayers.benchmarks import common as bc


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dilated_conv1d" in out and "torch" in out and "auto backend here" in out


def test_check_all_ops_pass(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "dinitial_state" in out


def test_bench_harness_writes_json_table_and_plot(tmp_path):
    def make():
        return {"x": torch.randn(64, 64, requires_grad=True)}
    case = bc.Case(op="demo", name="matmul 64", dtype=torch.float32, make_inputs=make,
                   impls={"fastlayers": lambda x: x @ x, "reference": lambda x: (x @ x).clone()},
                   grad_inputs=("x",), flops=lambda mode: 2 * 64 ** 3 * (1 if mode == "fwd" else 3))
    env = bc.environment()
    rows = bc.run_case(case, torch.device("cpu"), None, env)
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    fl = [r for r in rows if r["impl"] == "fastlayers"]
    assert all(r["ms"] > 0 and r["TFLOP/s"] > 0 and "reference" in r["speedup"] for r in fl)
    paths = bc.write_results(rows, env, str(tmp_path), "demo")
    data = json.load(open(paths["json"]))
    assert len(data["rows"]) == 6 and data["env"]["torch"] == torch.__version__
    assert "| demo | matmul 64 |" in open(paths["md"]).read()
    assert os.path.getsize(paths["png"]) > 1000


def test_bench_on_cpu_says_so_and_runs(tmp_path, capsys):
    assert cli.main(["bench", "--ops", "dilated_conv1d", "--modes", "fwd", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "reference+compile" in out
    assert os.listdir(os.path.join(tmp_path, "cpu"))
