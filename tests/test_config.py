"""Invalid configurations fail early with field, value and rule; --print_config round-trips."""
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_cli, tiny_config
from hsa_lightning.errors import ConfigError
from hsa_lightning.lit.module import HSALitModule

BAD_MODEL_CONFIGS = [
    (dict(n_heads=12, hsa_kv_heads=5), "n_heads=12 is not divisible by hsa_kv_heads=5"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(chunk_size=48), "chunk_size=48 is not a power of two"),
    (dict(top_k=0), "top_k=0 must be >= 1"),
    (dict(window=0), "window=0 must be >= 1"),
    (dict(hsa_window=-2), "hsa_window=-2 must be >= 1"),
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4; set head_dim"),
    (dict(head_dim=7), "head_dim=7 must be a positive even number (RoPE rotates pairs)"),
    (dict(retrieval_dim=33, hsa_kv_heads=2), "retrieval_dim=33 is not divisible by hsa_kv_heads=2"),
    (dict(vocab_size=0), "vocab_size=0 must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD_MODEL_CONFIGS)
def test_model_config_errors_name_field_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    assert str(err.value) == message


BAD_LAYOUTS = [
    ({"class_path": "UltraLong", "init_args": {"groups": 3}},
     "UltraLong: the upper decoder has n_layers - lower_layers = 4 - 2 = 2 blocks, which must be a positive "
     "multiple of groups=3"),
    ({"class_path": "UltraLong", "init_args": {"groups": 1, "swa_per_group": 2}},
     "UltraLong swa_per_group=2 does not fit n_layers=4: 2 lower + 1 x (1 HSA + R SWA) blocks needs R=1"),
    ({"class_path": "Pattern", "init_args": {"pattern": "SS|HX"}},
     "Pattern pattern='SS|HX' has unknown letters ['X']; use S (SWA), F (full), H (HSA), | (encoder)"),
    ({"class_path": "Pattern", "init_args": {"pattern": "SS|H"}}, "Pattern pattern='SS|H' has 3 blocks but n_layers=4"),
    ({"class_path": "Pattern", "init_args": {"pattern": "SHS|H"}}, "layout Pattern has an HSA block before the chunk encoder; HSA reads its memory"),
]


@pytest.mark.parametrize("layout,message", BAD_LAYOUTS)
def test_layout_errors_are_raised_before_any_model_is_built(layout, message):
    with pytest.raises(ConfigError) as err:
        HSALitModule(config=tiny_config(), layout=layout)
    assert str(err.value) == message


@pytest.mark.slow
def test_cli_reports_config_errors_cleanly_with_exit_code_2(tmp_path):
    res = run_cli(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.config.n_heads", "12",
                   "--model.config.hsa_kv_heads", "5"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "error: n_heads=12 is not divisible by hsa_kv_heads=5"
    res = run_cli(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.attention", "Flsh"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "error: unknown attention plugin 'Flsh'; known attention plugins: Flash, HSAReference, HSATriton, reference, triton; "
        "did you mean 'Flash'?"
    )
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.slow
def test_print_config_round_trips_to_the_same_model(tmp_path):
    from hsa_lightning.cli import HSALightningCLI

    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--model.attention", "Flash",
            "--model.config.top_k", "3", "--model.layout", "Pattern", "--model.layout.pattern", "SS|HH"]
    first = run_cli([*args, "--print_config"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = tmp_path / "resolved.yaml"
    saved.write_text(first.stdout)
    second = run_cli(["fit", "--config", str(saved), "--print_config"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == first.stdout
    tree = yaml.safe_load(first.stdout)
    assert tree["model"]["attention"] == "Flash" and tree["model"]["config"]["top_k"] == 3

    def build(cli_args):
        cli = HSALightningCLI(args=cli_args, run=False)  # in-process, so the two models can be compared
        torch.manual_seed(0)
        cli.model.configure_model()
        return cli.model

    for key in ("ckpt_path", "weights_only"):  # fit-only keys; run=False parses without subcommands
        tree.pop(key, None)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tree))
    a, b = build(args[1:]), build(["--config", str(plain)])
    assert type(a.attention) is type(b.attention) and a.config == b.config and a.layout.steps == b.layout.steps
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
