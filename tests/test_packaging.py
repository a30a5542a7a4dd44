"""plugins/ and kernels/ install inside the hsa_lightning namespace; the package list is complete."""
import tomllib

from conftest import ROOT


def test_every_package_directory_is_listed_under_its_installed_name():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for top, installed in (("hsa_lightning", "hsa_lightning"), ("plugins", "hsa_lightning.plugins"),
                           ("kernels", "hsa_lightning.kernels")):
        assert setuptools["package-dir"][installed] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((installed, *rel)))
    assert found == listed


def test_installed_names_import():
    import hsa_lightning.kernels.hsa.naive as naive
    import hsa_lightning.plugins.attention.flash as flash

    assert naive.__file__.endswith("kernels/hsa/naive.py")
    assert flash.__file__.endswith("plugins/attention/flash.py")
