"""The plugin surface: the capability table behind NotAvailableYet, strict registration
(misspelled hooks, duplicate names), tool providers, logits processors, samplers, pipeline
kinds, and the load options that used to be ignored or read from the environment."""
import types

import pytest
import torch

from mistralrs import ChatCompletionRequest, CompletionRequest, NotAvailableYet, Runner, Which
from mistralrs_core import capabilities, plugins
from mistralrs_core.errors import WrongModelKind
from mistralrs_core.hookspecs import hookimpl

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fresh_plugins(without_tools_distribution):
    """In-process plugins registered by a test are forgotten after it; the tests gate on
    capabilities as an installation without mistralrs-tools-mcp has them."""
    yield plugins


def plugin(**hooks):
    """A plugin object whose hooks are the given functions (marked as implementations)."""
    return types.SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def capability_plugin(*names):
    def mistralrs_register_capabilities(register):
        for n in names:
            register(n, provides="test")
    return plugin(mistralrs_register_capabilities=mistralrs_register_capabilities)


# --- the capability table -----------------------------------------------------------------
def test_every_gated_argument_is_known_once():
    seen = {}
    for cap in capabilities.KNOWN.values():
        for field in cap.request_fields + cap.runner_args + cap.which_fields + cap.methods:
            assert field not in seen, f"{field} gated by both {seen[field]} and {cap.name}"
            seen[field] = cap.name
    # Every entry of the three former hand lists.
    for field in ("grammar", "tool_schemas", "web_search_options", "enable_code_execution", "enable_shell",
                  "max_tool_rounds", "tool_dispatch_url", "session_id", "files", "input_files", "adapter",
                  "which_draft", "mtp_model", "anymoe_config", "num_device_layers", "enable_search",
                  "search_embedding_model", "search_callback", "tool_callbacks", "mcp_client_config",
                  "code_execution_config", "shell_config", "in_situ_quant", "topology", "organization",
                  "from_uqff", "write_uqff", "calibration_file", "imatrix", "matformer_config_path",
                  "matformer_slice_name", "send_re_isq"):
        assert field in seen, field


def test_request_field_gate_both_ways(fresh_plugins):
    # (grammar, the first gated field, is provided by the core now: web search stands in)
    req = ChatCompletionRequest(messages=CHAT, web_search_options={"search_context_size": "low"})
    with pytest.raises(NotAvailableYet, match=r"^web_search_options \(web search\).*install"):
        capabilities.check_request(req)
    capabilities.check_request(ChatCompletionRequest(messages=CHAT))   # unset fields ask for nothing
    plugins.register_plugin(capability_plugin("web_search"), "search_test_plugin")
    capabilities.check_request(req)
    assert capabilities.provided()["web_search"] == "search_test_plugin"
    # Other fields stay gated.
    with pytest.raises(NotAvailableYet, match="enable_code_execution"):
        capabilities.check_request(ChatCompletionRequest(messages=CHAT, enable_code_execution=True))


def test_runner_and_which_gates_both_ways(fresh_plugins, tiny_dir):
    with pytest.raises(NotAvailableYet, match=r"mtp_model.*multi-token prediction"):
        capabilities.check_runner_args(mtp_model=object())
    # Speculative decoding is the core's own (engine/speculative.py).
    assert capabilities.provided()["speculative"] == "core"
    capabilities.check_runner_args(which_draft=object())
    # (in_situ_quant and from_uqff, the examples here once, are served by mistralrs-quant now)
    with pytest.raises(NotAvailableYet, match=r"mtp_model.*multi-token prediction"):
        Runner(which=Which.Plain(model_id=str(tiny_dir)), mtp_model=Which.Plain(model_id=str(tiny_dir)))
    # AnyMoE is the core's own (mistralrs_core/anymoe): the gate opens, the value is checked.
    assert capabilities.provided()["anymoe"] == "core"
    with pytest.raises(ValueError, match=r"^anymoe_config: expected an AnyMoeConfig"):
        Runner(which=Which.Plain(model_id=str(tiny_dir)), anymoe_config=object())
    which = Which.Plain(model_id=str(tiny_dir), matformer_config_path="m.yml")
    with pytest.raises(NotAvailableYet, match=r"Which.Plain\(matformer_config_path=...\).*install"):
        capabilities.check_which(which)
    capabilities.check_which(which, supported={"matformer_config_path"})   # a loader that handles it
    plugins.register_plugin(capability_plugin("mtp", "matformer"), "mtp_matformer_plugin")
    capabilities.check_runner_args(mtp_model=object())
    capabilities.check_which(which)
    assert capabilities.provided()["isq"] == "quant"    # send_re_isq's gate: mistralrs-quant opens it
    capabilities.check_method("send_re_isq")


# --- strict registration ------------------------------------------------------------------
def test_misspelled_hook_fails_its_plugin_only(fresh_plugins):
    def mistralrs_register_architecture(register):   # missing "s"
        register("Typo", "x:y", kind="text")
    plugins.register_plugin(plugin(mistralrs_register_architecture=mistralrs_register_architecture), "typo_plugin")
    failed = plugins.failed_plugins()
    assert "typo_plugin" in failed and "mistralrs_register_architecture" in failed["typo_plugin"]
    assert "typo_plugin" not in plugins.installed_plugins()
    assert plugins.get_registry().architecture("TinyTest") is not None
    assert plugins.get_registry().architecture("Typo") is None


def test_bad_hook_signature_fails_its_plugin_only(fresh_plugins):
    def mistralrs_register_loaders(regster):
        regster("x", "y:z")
    plugins.register_plugin(plugin(mistralrs_register_loaders=mistralrs_register_loaders), "sig_plugin")
    assert "sig_plugin" in plugins.failed_plugins()
    assert "safetensors" in plugins.get_registry().loaders


def test_duplicate_registration_names_both_plugins(fresh_plugins):
    def arch(register):
        register("Unique", "x:A", kind="text")
        register("TinyTest", "x:B", kind="text", hf_model_types=("other",))
    plugins.register_plugin(plugin(mistralrs_register_architectures=arch), "dup_arch_plugin")
    failed = plugins.failed_plugins()
    assert "'TinyTest' is registered by both 'tiny_family' and 'dup_arch_plugin'" in failed["dup_arch_plugin"]
    reg = plugins.get_registry()
    assert reg.architecture("TinyTest").plugin == "tiny_family"
    assert reg.architecture("Unique") is None          # none of a failed plugin's entries are kept
    assert "dup_arch_plugin" not in plugins.installed_plugins()

    # The same name under another kind is another family.
    def other_kind(register):
        register("TinyTest", "x:C", kind="embedding")
    plugins.register_plugin(plugin(mistralrs_register_architectures=other_kind), "kind_plugin")
    assert "kind_plugin" not in plugins.failed_plugins()
    assert plugins.get_registry().architecture("TinyTest", "embedding").plugin == "kind_plugin"

    for hook, table_name, name in (("mistralrs_register_loaders", "loader", "safetensors"),
                                   ("mistralrs_register_samplers", "sampler", "default"),
                                   ("mistralrs_register_quantizers", "quantizer", "none")):
        pname = f"dup_{table_name}_plugin"
        plugins.register_plugin(plugin(**{hook: lambda register, name=name: register(name, "x:y")}), pname)
        assert f"{table_name} {name!r} is registered by both 'core' and {pname!r}" in plugins.failed_plugins()[pname]

    plugins.register_plugin(capability_plugin("matformer"), "cap_a")
    plugins.register_plugin(capability_plugin("matformer"), "cap_b")
    assert "capability 'matformer' is registered by both 'cap_a' and 'cap_b'" in plugins.failed_plugins()["cap_b"]
    assert capabilities.provided()["matformer"] == "cap_a"
    plugins.register_plugin(capability_plugin("grammar"), "cap_c")
    assert "capability 'grammar' is registered by both 'core' and 'cap_c'" in plugins.failed_plugins()["cap_c"]


def test_unknown_registration_keyword_fails_the_plugin(fresh_plugins):
    def arch(register):
        register("Kw", "x:A", kind="text", gguf_architecture=("kw",))   # typo'd keyword
    plugins.register_plugin(plugin(mistralrs_register_architectures=arch), "kw_plugin")
    assert "gguf_architecture" in plugins.failed_plugins()["kw_plugin"]


def test_architecture_registration_carries_targets(fresh_plugins):
    def arch(register):
        register("WithTargets", "mistralrs_core.pipeline.text:TextPipeline", kind="text",
                 processor="mistralrs_core.pipeline.base:Pipeline",
                 pipeline="mistralrs_core.pipeline.text:TextPipeline",
                 config_from_gguf="mistralrs_core.pipeline.base:kind_of")
    plugins.register_plugin(plugin(mistralrs_register_architectures=arch), "targets_plugin")
    e = plugins.get_registry().architecture("WithTargets")
    from mistralrs_core.pipeline.base import Pipeline, kind_of
    from mistralrs_core.pipeline.text import TextPipeline
    assert e.load_processor() is Pipeline and e.load_pipeline() is TextPipeline
    assert e.load_config_from_gguf() is kind_of
    assert plugins.get_registry().architecture("TinyTest").load_pipeline() is None


def test_describe_lists_capabilities_and_processors(fresh_plugins):
    def lp(register):
        register("noop", lambda request, tokenizer: None)
    plugins.register_plugin(plugin(mistralrs_register_logits_processors=lp), "lp_plugin")
    # (LoRA is the core's own now: multi-token prediction stands in for a plugin's capability)
    plugins.register_plugin(capability_plugin("mtp"), "mtp_plugin")
    text = plugins.describe()
    assert "logits processors:\n  noop <- lp_plugin" in text
    assert "mtp: provided by mtp_plugin" in text
    assert "lora: provided by core" in text
    assert "matformer: not installed (install a later mistralrs-core)" in text
    assert "grammar: provided by core" in text


# --- consumed tables ----------------------------------------------------------------------
def test_make_sampler_uses_the_registry(fresh_plugins):
    from mistralrs_core.sampling.sampler import Sampler
    assert type(plugins.make_sampler()) is Sampler

    class Mine(Sampler):
        pass
    plugins.register_plugin(plugin(mistralrs_register_samplers=lambda register: register("mine", Mine)),
                            "sampler_plugin")
    assert type(plugins.make_sampler("mine")) is Mine
    with pytest.raises(ValueError, match="sampler 'nope' is not registered"):
        plugins.make_sampler("nope")


def test_logits_processors_for_request(fresh_plugins):
    seen = []

    def ban_token_3(request, tokenizer):
        if getattr(request, "max_tokens", None) != 7:
            return None

        def proc(output_ids, logits):
            seen.append(list(output_ids))
            logits = logits.clone()
            logits[3] = float("-inf")
            return logits
        return proc

    def lp(register):
        register("ban3", ban_token_3)
    plugins.register_plugin(plugin(mistralrs_register_logits_processors=lp), "ban_plugin")
    assert plugins.logits_processors_for(ChatCompletionRequest(messages=CHAT, max_tokens=2), None) == []
    procs = plugins.logits_processors_for(ChatCompletionRequest(messages=CHAT, max_tokens=7), None)
    assert len(procs) == 1
    out = procs[0]([1, 2], torch.zeros(5))
    assert out[3] == float("-inf") and seen == [[1, 2]]

    def bad(register):
        register("bad", lambda request, tokenizer: 42)
    plugins.register_plugin(plugin(mistralrs_register_logits_processors=bad), "bad_lp_plugin")
    with pytest.raises(TypeError, match="'bad' .*bad_lp_plugin.* not a callable"):
        plugins.logits_processors_for(ChatCompletionRequest(messages=CHAT), None)


class SearchTools:
    """An in-process tool provider serving ``search_callback`` only (``tool_callbacks`` are
    served by the core's own provider, ``mistralrs_core.agent.callbacks``)."""
    accepts = ("search_callback",)

    def claims(self, args):
        return "search_callback" in args

    closed = []

    def build(self, args):
        names = [args["search_callback"].__name__]
        return types.SimpleNamespace(names=names, close=lambda: SearchTools.closed.append(names))


def test_tool_providers_take_runner_arguments(fresh_plugins, tiny_dir):
    which = Which.Plain(model_id=str(tiny_dir), dtype="F32")

    def lookup(query):
        return []
    with pytest.raises(NotAvailableYet, match=r"search_callback.*install mistralrs-tools-mcp"):
        Runner(which=which, search_callback=lookup)
    plugins.register_plugin(
        plugin(mistralrs_register_tool_providers=lambda register: register("search", SearchTools)),
        "tools_plugin")
    r = Runner(which=which, search_callback=lookup, tool_callbacks={"f": lambda name, args: "42"})
    try:
        assert r.tool_providers()["search"].names == ["lookup"]
        assert r.tool_providers()["python_callbacks"].can_call("f")   # the core's own provider
    finally:
        r.shutdown()
    assert SearchTools.closed == [["lookup"]] and r.tool_providers() == {}
    # An argument no provider takes is still refused, naming what to install ...
    with pytest.raises(NotAvailableYet, match=r"mcp_client_config.*install mistralrs-tools-mcp"):
        Runner(which=which, search_callback=lookup, mcp_client_config={"servers": []})
    # ... even when some plugin claims the capability but brings no provider for it.
    plugins.register_plugin(capability_plugin("mcp"), "mcp_cap_plugin")
    with pytest.raises(NotAvailableYet, match=r"mcp_client_config.*no installed tool provider"):
        Runner(which=which, mcp_client_config={"servers": []})


# --- pipeline kinds -----------------------------------------------------------------------
def test_kind_dispatch_names_the_model(tiny_runner, tiny_dir):
    mid = str(tiny_dir)
    assert tiny_runner.model_kind() == "text"
    from mistralrs import EmbeddingRequest, ImageGenerationResponseFormat
    with pytest.raises(WrongModelKind, match=rf"model_id: model '{mid}' is not an embedding model \(it is a "
                                             rf"text model\); send_embedding_request"):
        tiny_runner.send_embedding_request(EmbeddingRequest(input="hi"))
    with pytest.raises(ValueError, match="is not a diffusion model"):
        tiny_runner.generate_image("a cat", ImageGenerationResponseFormat.Url)
    with pytest.raises(ValueError, match="is not a speech model"):
        tiny_runner.generate_audio("hello")


def test_stream_completion_request(tiny_runner):
    req = CompletionRequest(prompt="hello", max_tokens=3, temperature=0, ignore_eos=True)
    chunks = list(tiny_runner.stream_completion_request(req))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tiny_runner.send_completion_request(req).choices[0].text


# --- load options that used to be ignored ---------------------------------------------------
def test_paged_attn_options(tiny_dir):
    which = Which.Plain(model_id=str(tiny_dir), dtype="F32")
    r = Runner(which=which, paged_attn=True)   # always paged: satisfied
    r.shutdown()
    with pytest.raises(NotAvailableYet, match=r"no_paged_attn=True.*always a paged block pool"):
        Runner(which=which, no_paged_attn=True)
    with pytest.raises(ValueError, match="contradict"):
        Runner(which=which, paged_attn=True, no_paged_attn=True)


def test_tokenize_text_enable_thinking(tiny_runner, tiny_dir):
    plain = tiny_runner.tokenize_text("hello world", add_special_tokens=False)
    assert tiny_runner.tokenize_text("hello world", False, None) == plain
    # The tiny model's ChatML template has no thinking switch: the argument cannot mean anything.
    with pytest.raises(ValueError, match="enable_thinking: model .* has no thinking switch"):
        tiny_runner.tokenize_text("hello world", False, True)
    thinking = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}")
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), chat_template=thinking)
    try:
        # Raw text is not templated (as upstream): the switch is accepted and the ids are the same.
        assert r.tokenize_text("hello world", False, False) == plain
        assert r.tokenize_text("hello world", False, True) == plain
        with pytest.raises(ValueError, match="enable_thinking: must be a bool"):
            r.tokenize_text("hello world", False, "yes")
    finally:
        r.shutdown()


def test_quant_kernel_refused_for_unquantized_models(tiny_dir):
    with pytest.raises(ValueError, match="quant_kernel: 'vnni' selects a kernel for GGUF/GGML weights"):
        Runner(which=Which.Plain(model_id=str(tiny_dir)), quant_kernel="vnni")


# --- GGUF: a family's own config builder, the quant_kernel load option ----------------------
VOCAB = 288


def _tiny_qwen2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def gguf_tools():
    pytest.importorskip("mistralrs_quant")
    pytest.importorskip("gguf")
    import os
    import sys
    here = os.path.dirname(__file__)
    sys.path.insert(0, os.path.join(here, "..", "plugins", "quant", "tests"))
    import gguf_convert
    return gguf_convert


def _write_under_arch(gc, path, arch):
    """A float Qwen2 file written under the architecture name ``arch`` (keys ``<arch>.*``)."""
    import gguf
    cfg, ref = _tiny_qwen2()
    w = gguf.GGUFWriter(str(path), arch)
    gc.write_metadata(w, "qwen2", cfg)
    gc.add_gpt2_tokenizer(w, VOCAB)
    for e in gc.gguf_entries("qwen2", ref, cfg):
        w.add_tensor(e.name, e.value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BUILT = []


def martian_config(meta, vocab_size, tied):
    """A third-party family's builder, reusing the GGUF plugin's shared helper."""
    from mistralrs_quant.gguf_config import common_config
    BUILT.append(meta.arch)
    cfg = common_config(meta, vocab_size, tied)
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return cfg


def test_family_brings_its_own_gguf_config_builder(fresh_plugins, gguf_tools, tmp_path):
    path = _write_under_arch(gguf_tools, tmp_path / "martian.gguf", "martian")
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename=path.name)

    def no_builder(register):
        register("Martian", "mistralrs_arch_text.qwen2:Qwen2ForCausalLM", kind="text",
                 gguf_architectures=("martian",))
    plugins.register_plugin(plugin(mistralrs_register_architectures=no_builder), "martian_plain")
    with pytest.raises(ValueError, match=r"'martian' is not supported: family 'Martian' \(martian_plain\) "
                                         r"registers no config_from_gguf"):
        Runner(which=which)
    plugins.reset()

    def with_builder(register):
        register("Martian", "mistralrs_arch_text.qwen2:Qwen2ForCausalLM", kind="text",
                 gguf_architectures=("martian",), config_from_gguf=f"{__name__}:martian_config")
    plugins.register_plugin(plugin(mistralrs_register_architectures=with_builder), "martian_family")
    BUILT.clear()
    r = Runner(which=which)
    try:
        assert BUILT == ["martian"]
        assert type(r._pipeline(None).model).__name__ == "Qwen2ForCausalLM"
        out = r.send_completion_request(CompletionRequest(prompt="ab", max_tokens=2, ignore_eos=True))
        assert out.usage.completion_tokens == 2
    finally:
        r.shutdown()


def test_quant_kernel_reaches_the_quant_methods(gguf_tools, tmp_path):
    cfg, ref = _tiny_qwen2()
    gguf_tools.write_gguf(tmp_path / "q.gguf", "qwen2", ref, cfg, "Q8_0", tokenizer_size=VOCAB)
    which = Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename="q.gguf")
    with pytest.raises(ValueError, match="quant_kernel: unknown C\\+\\+ kernel variant 'fastest'"):
        Runner(which=which, quant_kernel="fastest")
    from mistralrs_quant.kernels import cpp
    for kernel in (None, "vnni"):
        r = Runner(which=which, quant_kernel=kernel)
        try:
            methods = [m.qmethod for m in r._pipeline(None).model.modules()
                       if getattr(m, "qmethod", None) is not None]
            assert methods and all(q._options["cpp_impl"] == kernel for q in methods)
            if kernel == "vnni" and cpp.available() and cpp.build_info().get("vnni"):
                assert {q.cpp.impl_name for q in methods if q.cpp is not None} == {"vnni"}
        finally:
            r.shutdown()


def test_registered_logits_processor_shapes_a_request_through_the_runner(fresh_plugins, tiny_dir):
    """The table is consumed end to end: each choice gets its own processor (stateful ones,
    such as grammar matchers, are never shared), and it changes what is sampled."""
    from mistralrs import CompletionRequest, Runner, Which
    from mistralrs_core.testing.parity import our_greedy
    made = []

    def ban_first_greedy(request, tokenizer):
        if request.max_tokens != 5:
            return None
        state = {"banned": None}

        def proc(output_ids, logits):
            if not output_ids:                  # the first step of this choice
                state["banned"] = int(logits.argmax())
                logits = logits.clone()
                logits[state["banned"]] = float("-inf")
            return logits
        made.append(state)
        return proc
    plugins.register_plugin(plugin(mistralrs_register_logits_processors=lambda register: register(
        "ban_first", ban_first_greedy)), "ban_first_plugin")
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0)
    try:
        pipe = r._pipeline(None)
        prompt = "the quick brown fox"
        ids = pipe.tokenizer.encode(prompt, add_special_tokens=True)
        first = our_greedy(pipe.model, ids, 1)[0]
        req = CompletionRequest(prompt=prompt, model="default", max_tokens=5, temperature=0.0, n_choices=2,
                                ignore_eos=True)
        res = r.send_completion_request(req)
        assert len(made) == 2 and all(s["banned"] == first for s in made)
        for c in res.choices:
            assert pipe.tokenizer.encode(c.text, add_special_tokens=False)[0] != first
        plain = r.send_completion_request(CompletionRequest(prompt=prompt, model="default", max_tokens=4,
                                                            temperature=0.0, ignore_eos=True))
        assert len(made) == 2 and plain.choices[0].text.startswith(pipe.tokenizer.decode([first]))
    finally:
        r.shutdown()
