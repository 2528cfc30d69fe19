"""The plugin's registrations: lazy, independent of the other family plugins, and the core's
refusal of Which.Speech without it."""
import json
import os
import subprocess
import sys

from mistralrs_core import capabilities, plugins


def _run(code: str, **env) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_listing_imports_no_model_code_and_speech_imports_no_other_plugin():
    listed, others = json.loads(_run(
        "import sys, json\n"
        "from mistralrs_core import plugins\n"
        "import mistralrs_arch_speech.plugin as p\n"
        "if 'arch_speech' not in plugins.installed_plugins(): plugins.register_plugin(p, 'arch_speech')\n"
        "plugins.describe()\n"
        "listed = sorted(m for m in sys.modules if m.startswith('mistralrs_arch_speech.'))\n"
        "import mistralrs_arch_speech.loader, mistralrs_arch_speech.pipeline, mistralrs_arch_speech.engine\n"
        "others = sorted(m for m in sys.modules if m.startswith('mistralrs_arch') and '.' in m\n"
        "                and not m.startswith('mistralrs_arch_speech') and not m.endswith('.plugin'))\n"
        "print(json.dumps([listed, others]))"))
    assert listed == ["mistralrs_arch_speech.plugin"]
    assert others == []


def test_speech_loader_and_capability_are_registered():
    reg = plugins.get_registry()
    assert reg.loaders["speech"].plugin == "arch_speech"
    assert reg.architecture("Dia", "speech").plugin == "arch_speech"
    assert capabilities.available("speech")


def test_without_the_plugin_speech_names_the_distribution(tmp_path):
    msg = _run(
        "from mistralrs import Runner, Which, SpeechLoaderType\n"
        "try:\n"
        f"    Runner(which=Which.Speech(model_id={str(tmp_path)!r}, arch=SpeechLoaderType.Dia, dac_model_id='x'))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__ + ': ' + str(e).replace('\\n', ' '))\n",
        MISTRALRS_PLUGINS="none")
    assert msg.startswith("NotAvailableYet") and "mistralrs-arch-speech" in msg
