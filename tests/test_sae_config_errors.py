"""Every SAE / SAETraining argument a user can get wrong is refused at construction with one ConfigError that
names the argument, the allowed range and the config key to fix; through ``mim fit`` it is one ``mim: error:``
line with exit code 2 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mim.cli import main
from mim.errors import ConfigError
from mim.sae import AbsTopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, MPSAE, ReLUSAE, TopAFASAE, TopKSAE
from mim.sae.module import SAETraining

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sae" / "topk_vit_tiny_cifar10.yaml"
SAE_KEY = "--model.init_args.sae.init_args."

#: (what to build, the argument it names, a fragment of the message)
SAE_CASES = [
    (lambda: TopKSAE(0, 64, k=4), "d_model", "must be positive"),
    (lambda: TopKSAE(16, 0, k=1), "d_sae", "must be positive"),
    (lambda: TopKSAE(16, 64, k=4, dead_tokens=0), "dead_tokens", "must be positive"),
    (lambda: TopKSAE(16, 64, k=0), "k", "must be in [1, d_sae=64], got 0"),
    (lambda: TopKSAE(16, 64, k=65), "k", "must be in [1, d_sae=64], got 65"),
    (lambda: TopKSAE(16, 64, k=4, k_aux=0), "k_aux", "must be positive"),
    (lambda: TopKSAE(16, 64, k=4, aux_coeff=-0.1), "aux_coeff", "must be >= 0"),
    (lambda: AbsTopKSAE(16, 64, k=100), "k", "must be in [1, d_sae=64]"),
    (lambda: BatchTopKSAE(16, 64, k=4, threshold_beta=1.0), "threshold_beta", "must lie in [0, 1), got 1.0"),
    (lambda: BatchTopKSAE(16, 64, k=4, threshold_beta=-0.5), "threshold_beta", "must lie in [0, 1)"),
    (lambda: MatryoshkaSAE(16, 64, k=4, prefixes=[32, 16, 64]), "prefixes", "increase strictly and end at d_sae=64"),
    (lambda: MatryoshkaSAE(16, 64, k=4, prefixes=[16, 128]), "prefixes", "end at d_sae=64"),
    (lambda: MatryoshkaSAE(16, 64, k=4, prefixes=[0, 64]), "prefixes", "(sizes >= 1)"),
    (lambda: MatryoshkaSAE(16, 64, k=4, prefixes=[]), "prefixes", "got []"),
    (lambda: TopAFASAE(16, 64, k_max=0), "k_max", "must be positive"),
    (lambda: TopAFASAE(16, 64, k_max=8, afa_coeff=-1.0), "afa_coeff", "must be >= 0"),
    (lambda: ReLUSAE(16, 64, l1_coeff=0.0), "l1_coeff", "must be positive"),
    (lambda: ReLUSAE(16, 64, l1_warmup_steps=-1), "l1_warmup_steps", "must be >= 0"),
    (lambda: JumpReLUSAE(16, 64, l0_coeff=-1.0), "l0_coeff", "must be positive"),
    (lambda: JumpReLUSAE(16, 64, bandwidth=0.0), "bandwidth", "must be positive"),
    (lambda: JumpReLUSAE(16, 64, bandwidth=float("nan")), "bandwidth", "got nan"),
    (lambda: JumpReLUSAE(16, 64, init_threshold=0.0), "init_threshold", "must be positive"),
    (lambda: MPSAE(16, 64, steps=0), "steps", "must be positive"),
]


@pytest.mark.parametrize(("build", "name", "fragment"), SAE_CASES, ids=[f"{i}-{c[1]}" for i, c in enumerate(SAE_CASES)])
def test_bad_sae_argument_is_refused_at_construction(build, name, fragment):
    with pytest.raises(ConfigError) as err:
        build()
    message = str(err.value)
    assert message.startswith(f"SAE {name} must"), message
    assert fragment in message and "Fix: " in message
    assert message.endswith(f"({SAE_KEY}{name}).")  # the config key to change


TRAINING_CASES = [
    ({"lr": 0.0}, "lr", "must be > 0, got 0.0"),
    ({"lr": -1e-3}, "lr", "must be > 0"),
    ({"betas": (0.9, 1.0)}, "betas", "must be two numbers in [0, 1)"),
    ({"eps": 0.0}, "eps", "must be > 0"),
    ({"warmup_steps": -1}, "warmup_steps", "must be >= 0, got -1"),
    ({"decay_fraction": 1.5}, "decay_fraction", "must lie in [0, 1], got 1.5"),
    ({"decay_fraction": -0.1}, "decay_fraction", "must lie in [0, 1]"),
    ({"init_tokens": 0}, "init_tokens", "must be >= 1, got 0"),
    ({"dense_threshold": 0.0}, "dense_threshold", "must lie in (0, 1]"),
]


@pytest.mark.parametrize(("kwargs", "name", "fragment"), TRAINING_CASES, ids=[c[1] for c in TRAINING_CASES])
def test_bad_training_argument_is_refused_at_construction(kwargs, name, fragment):
    with pytest.raises(ConfigError) as err:
        SAETraining(TopKSAE(16, 64, k=4), **kwargs)
    message = str(err.value)
    assert message.startswith(f"SAETraining {name} must") and fragment in message, message
    assert f"Fix: set --model.init_args.{name}, e.g. " in message


def test_good_arguments_at_the_edges_are_accepted():
    TopKSAE(16, 64, k=64, k_aux=1, aux_coeff=0.0)
    BatchTopKSAE(16, 64, k=1, threshold_beta=0.0)
    MatryoshkaSAE(16, 64, k=4, prefixes=[64])
    TopAFASAE(16, 64, k_max=1000, afa_coeff=0.0)  # a cap above d_sae acts as d_sae
    ReLUSAE(16, 64, l1_warmup_steps=0)
    SAETraining(TopKSAE(16, 64, k=4), warmup_steps=0, decay_fraction=1.0, init_tokens=1, betas=(0.0, 0.0))


def _check_one_line_error(returncode: int, stderr: str, expected: str) -> None:
    # Lightning logs "Seed set to 0" (the config's seed_everything) before the model is built; nothing else
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Seed set to ")]
    assert returncode == 2, stderr
    assert lines[0].startswith("mim: error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([f"{SAE_KEY}k", "0"], f"SAE k must be in [1, d_sae=3072], got 0. Fix: choose 1 <= k <= 3072 (or raise d_sae) "
                               f"({SAE_KEY}k)."),
        (["--model.init_args.decay_fraction", "1.5"], "SAETraining decay_fraction must lie in [0, 1], got 1.5."),
    ],
    ids=["k", "decay_fraction"],
)
def test_cli_subprocess_prints_one_error_line(args, expected, tmp_path):
    """The real console entry point in a fresh interpreter (no store is needed: the model is refused first)."""
    res = subprocess.run(
        [sys.executable, "-m", "mim.cli", "fit", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={key: value for key, value in os.environ.items() if key != "MIM_TRACEBACK"},
    )
    _check_one_line_error(res.returncode, res.stderr, expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.sae", "mim.sae.JumpReLUSAE", f"{SAE_KEY}bandwidth", "0"],
         f"SAE bandwidth must be positive (> 0), got 0.0. Fix: set bandwidth to a positive number ({SAE_KEY}bandwidth)."),
        (["--model.init_args.sae", "mim.sae.MatryoshkaSAE", f"{SAE_KEY}prefixes", "[512, 256, 3072]"],
         "SAE prefixes must increase strictly and end at d_sae=3072 (sizes >= 1), got [512, 256, 3072]."),
        (["--model.init_args.warmup_steps", "-5"], "SAETraining warmup_steps must be >= 0, got -5."),
    ],
    ids=["jumprelu_bandwidth", "matryoshka_prefixes", "warmup_steps"],
)
def test_cli_main_prints_one_error_line(args, expected, tmp_path, monkeypatch, capsys):
    """``mim.cli.main`` (what the ``mim`` script runs) in this process: the same parsing and error handling."""
    monkeypatch.delenv("MIM_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["mim", "fit", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path),
                                      *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    _check_one_line_error(exit_info.value.code, capsys.readouterr().err, expected)
