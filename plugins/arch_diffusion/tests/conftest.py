import pytest

from mistralrs_core import plugins


def _ensure_registered():
    # Until the distribution is installed its entry point is not discovered; tests that
    # reset the plugin manager drop in-process plugins, so check before every test.
    if "arch_diffusion" not in plugins.installed_plugins():
        import mistralrs_arch_diffusion.plugin
        plugins.register_plugin(mistralrs_arch_diffusion.plugin, "arch_diffusion")


@pytest.fixture(scope="session", autouse=True)
def arch_diffusion_registered_session():
    _ensure_registered()


@pytest.fixture(autouse=True)
def arch_diffusion_registered(arch_diffusion_registered_session):
    _ensure_registered()


@pytest.fixture(scope="session")
def tiny_flux_models(tmp_path_factory):
    """variant -> (diffusers reference pipeline, diffusers folder, single-file folder)."""
    import tiny_flux

    out = {}
    for i, variant in enumerate(("schnell", "dev")):
        ref = tiny_flux.build(variant, seed=i)
        root = tmp_path_factory.mktemp(f"flux_{variant}")
        folder = tiny_flux.save(ref, root / "diffusers")
        single = tiny_flux.to_single_file(folder, root / "single", variant)
        out[variant] = (ref, folder, single)
    return out
