"""The command line as a user meets it: real subprocesses, one-line errors, complete run directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INSITU = [sys.executable, "-m", "insitu"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([*INSITU, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_help_lists_simulate(capsys):
    assert main_exit("--help") == 0
    assert "simulate" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "mnist"], "--dataset: unknown value 'mnist'"),
        (["--strategy", "fedmagic"], "--strategy: unknown value 'fedmagic'"),
        (["--partition", "zipf"], "partition 'zipf': unknown value 'zipf'"),
        (["--sites", "500", "--partition", "iid"], "--sites 500 is more than"),
        (["--dataset", "pneumoniamnist"], "needs --data PATH"),
        (["--data", "/nonexistent.csv"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    code = main_exit("simulate", *args, "--rounds", "1", "--out", str(out))
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_broken_csv_leaves_no_run_dir(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('id,age,sex\n1,"unterminated\n')
    code = main_exit("simulate", "--data", str(bad), "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def main_exit(*args: str) -> int:
    """Run the CLI in this process (as a user would, minus the interpreter start-up)."""
    from insitu.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_end_to_end_default_heart_run(tmp_path):
    out = tmp_path / "run"
    r = run("simulate", "--rounds", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "mean over sites" in r.stdout and "own model, own split" in r.stdout and "local model, every site" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    fin = summary["final"]
    assert 0.55 < fin["mean_site_accuracy"] <= 1 and 0.55 < fin["pooled_accuracy"] <= 1
    for base in ("local_only", "pooled"):
        assert {"mean_site_accuracy", "pooled_accuracy"} <= set(summary["baselines"][base])
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4, 5]
    assert set(lines[0]["sites"]) == {"cleveland", "hungary", "switzerland", "va-long-beach"}
    assert all("test_accuracy" in e and "train_loss" in e for e in lines[-1]["sites"].values())
    assert (out / "accuracy.png").stat().st_size > 5000
    assert (out / "model.npz").exists() and (out / "task.json").exists()

def test_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main_exit("simulate", "--rounds", "1", "--out", str(tmp_path / "run")) == 2
    assert "already exists" in capsys.readouterr().err


def test_an_existing_run_directory_is_refused_before_torch_loads(tmp_path):
    (tmp_path / "run").mkdir()
    probe = ("import sys\nfrom insitu.cli import main\ntry:\n    main(['simulate', '--out', sys.argv[1]])\n"
             "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert "already exists; choose another --out" in res.stderr


def test_seed_fixes_splits_and_init_while_site_randomness_stays_secret(tmp_path):
    """--seed fixes what is public (splits, initial model); each site's sampling comes from its own
    OS-random secret, so two runs differ, unless the same secrets are handed in (tests) or the run
    asks for replayable randomness by name (and is marked not private)."""
    from insitu.apps.simulate import simulate

    secrets = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}
    import numpy as np

    a = simulate(rounds=3, seed=7, baselines=False, out=str(tmp_path / "a"))
    b = simulate(rounds=3, seed=7, baselines=False, out=str(tmp_path / "b"))
    assert a["sites"] == b["sites"] and a["plan_hash"] == b["plan_hash"]
    assert not np.array_equal(np.load(tmp_path / "a" / "model.npz")["params"], np.load(tmp_path / "b" / "model.npz")["params"])
    assert a["private_randomness"] and b["private_randomness"]
    c = simulate(rounds=3, seed=7, baselines=False, write=False, site_secrets=secrets)
    d = simulate(rounds=3, seed=7, baselines=False, write=False, site_secrets=secrets)
    assert c["final"]["site_accuracy"] == d["final"]["site_accuracy"] and not c["private_randomness"]
    e = simulate(rounds=3, seed=7, baselines=False, write=False, insecure_replayable_randomness=True)
    f = simulate(rounds=3, seed=7, baselines=False, write=False, insecure_replayable_randomness=True)
    assert e["final"]["site_accuracy"] == f["final"]["site_accuracy"] and not e["private_randomness"]


def test_dropout_option_reports_dropped_sites():
    from insitu.apps.simulate import simulate

    s = simulate(rounds=6, dropout=0.4, seed=1, baselines=False, write=False)
    assert s["final"]["rounds_completed"] + s["final"]["rounds_aborted"] == 6


def test_best_val_selection_picks_a_round_by_validation(pneumonia_npz):
    from insitu.apps.simulate import simulate

    s = simulate(dataset="pneumoniamnist", data=str(pneumonia_npz), rounds=3, local_steps=2, select="best-val", baselines=False, write=False)
    assert 1 <= s["final"]["selected_round"] <= 3


def test_best_val_refused_for_heart(capsys):
    assert main_exit("simulate", "--select", "best-val", "--rounds", "1") == 2
    assert "needs validation splits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, where",
    [
        (["--dataset", "pneumoniamnist"], "https://medmnist.com"),
        (["--dataset", "pneumoniamnist", "--data", "no-such-dir/pneumoniamnist.npz"], "https://medmnist.com"),
        (["--dataset", "physionet2012"], "https://physionet.org/content/challenge-2012/"),
        (["--dataset", "physionet2012", "--data", "no-such-dir/physionet2012"], "https://physionet.org/content/challenge-2012/"),
    ],
)
def test_missing_data_set_says_where_to_get_it(tmp_path, capsys, args, where):
    """A new user who runs the README's X-ray or ICU line without the data learns that insitu does not
    ship it and where it comes from, not only that a path is missing."""
    out = tmp_path / "run"
    code = main_exit("simulate", *args, "--rounds", "1", "--out", str(out))
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "does not ship it" in err and where in err, err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "run.partial").exists()
