"""Registries: names, aliases, collisions, entry points, capability checks."""
import importlib.metadata as metadata

import pytest
import torch

from hsa_lightning.errors import PluginError
from hsa_lightning.lit.module import HSALitModule
from hsa_lightning.model.attention_backend import AttentionBackend
from hsa_lightning.plugins.attention.flash import Flash
from hsa_lightning.plugins.attention.hsa_reference import HSAReference
from hsa_lightning.registry import KINDS, Registry, build_plugin, registry


def test_every_kind_has_a_registry_with_its_entry_point_group():
    for kind in KINDS:
        assert registry(kind).group == f"hsa_lightning.{kind}"


def test_builtins_are_found_by_entry_point_name_class_name_alias_and_case():
    att = registry("attention")
    assert att.get("HSAReference") is HSAReference
    assert att.get("reference") is HSAReference
    assert att.get("flash") is Flash
    assert att.get("FLASH") is Flash
    assert "hsa-lightning" in att.origin("Flash")  # came through our own pyproject entry point
    assert {"UltraLong", "Dense", "SWA", "Pattern"} <= set(registry("layout").names())
    assert {"RoPE", "NoPE"} <= set(registry("position").names())
    assert "SwiGLU" in registry("ffn").names()


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(PluginError) as err:
        registry("attention").get("Flsh")
    assert str(err.value) == (
        "unknown attention plugin 'Flsh'; known attention plugins: Flash, HSAReference, HSATriton, reference, triton; "
        "did you mean 'Flash'?"
    )
    with pytest.raises(PluginError, match=r"^unknown layout plugin 'zzz'; known layout plugins: Dense, Pattern, SWA, UltraLong$"):
        registry("layout").get("zzz")


class _Mine(AttentionBackend):
    aliases = ("mine",)


class _Other(AttentionBackend):
    pass


def test_collision_between_two_classes_is_an_error_naming_both_origins():
    reg = Registry("attention", AttentionBackend)
    reg.add("Mine", _Mine, "dist-a 1.0 (a:Mine)")
    reg.add("Mine", _Mine, "dist-a 1.0 (a:Mine)")  # the same class again is fine (idempotent)
    with pytest.raises(PluginError) as err:
        reg.add("mine", _Other, "dist-b 2.0 (b:Other)")
    assert str(err.value) == (
        "attention plugin name 'mine' is claimed twice: by dist-a 1.0 (a:Mine) and by dist-b 2.0 (b:Other); "
        "uninstall one of them or rename its entry point"
    )
    assert "_Other" not in reg.names()  # the clash left nothing of the second class behind


def test_non_subclass_is_rejected():
    reg = Registry("attention", AttentionBackend)
    with pytest.raises(PluginError, match="is not a subclass of hsa_lightning.model.attention_backend.AttentionBackend"):
        reg.add("Dict", dict, "somewhere")


def test_entry_points_are_loaded_and_a_broken_one_is_reported_with_its_error(monkeypatch):
    group = "hsa_lightning.attention"
    eps = [
        metadata.EntryPoint("Mine", f"{__name__}:_Mine", group),
        metadata.EntryPoint("Broken", "no_such_module_for_hsa_tests:Thing", group),
    ]
    seen = {}

    def fake_entry_points(group):
        seen["group"] = group
        return eps

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    reg = Registry("attention", AttentionBackend)
    with pytest.warns(UserWarning, match="failed to import"):
        reg.load_entry_points()
    assert seen["group"] == group
    assert reg.get("Mine") is _Mine and reg.get("mine") is _Mine and reg.get("_Mine") is _Mine
    with pytest.raises(PluginError) as err:
        reg.get("Broken")
    assert str(err.value) == (
        "attention plugin 'Broken' from an unknown distribution (no_such_module_for_hsa_tests:Thing) failed to "
        "import: ModuleNotFoundError: No module named 'no_such_module_for_hsa_tests'"
    )


def test_build_plugin_accepts_names_instances_and_class_path_dicts():
    assert isinstance(build_plugin("attention", "flash"), Flash)
    inst = HSAReference()
    assert build_plugin("attention", inst) is inst
    layout = build_plugin("layout", {"class_path": "a.b.UltraLong", "init_args": {"groups": 3}})
    assert layout.groups == 3
    with pytest.raises(PluginError, match="^layout plugin UltraLong rejected init_args {'grups': 3}"):
        build_plugin("layout", {"class_path": "UltraLong", "init_args": {"grups": 3}})
    with pytest.raises(PluginError, match="^unknown position plugin 'Rope2'"):
        build_plugin("position", "Rope2")


class _CudaOnly(HSAReference):
    devices = frozenset({"cuda"})


class _NeedsMissing(HSAReference):
    requires = ("surely_not_installed_module",)


class _NoJoint(HSAReference):
    fusions = frozenset({"softmax"})


class _NoDouble(HSAReference):
    dtypes = frozenset({torch.float32})


def test_capabilities_are_checked_when_the_module_is_configured():
    with pytest.raises(PluginError) as err:
        HSALitModule(attention=_NeedsMissing())
    assert str(err.value) == "attention backend _NeedsMissing needs surely_not_installed_module, which is not installed"
    with pytest.raises(PluginError) as err:
        HSALitModule(config={"fusion": "joint"}, attention=_NoJoint())
    assert str(err.value) == "attention backend _NoJoint does not support fusion='joint'; it supports ['softmax']"
    module = HSALitModule(attention=_CudaOnly())
    with pytest.raises(PluginError) as err:
        module.configure_model()  # outside a Trainer the model is configured for the CPU
    assert str(err.value) == "attention backend _CudaOnly does not run on device='cpu'; it runs on ['cuda']"
    assert module.model is None
    with pytest.raises(PluginError) as err:
        HSALitModule(config={"n_heads": 32, "d_model": 256}, attention="HSATriton")
    assert str(err.value) == "attention backend HSATriton needs head_dim to be a power of two >= 16, got head_dim=8"
    with pytest.raises(PluginError, match=r"does not support dtype=torch.float64; it supports \['torch.float32'\]"):
        _NoDouble().check_runtime(torch.device("cpu"), torch.float64)
