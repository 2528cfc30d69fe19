"""Public API data classes: names, defaults, validation, JSON shape."""

from __future__ import annotations

import json
import pathlib

import attrs
import pytest

import mistralrs
from mistralrs import (
    AnyMoeConfig,
    AnyMoeExpertType,
    ApproximateUserLocation,
    Architecture,
    CalledFunction,
    ChatCompletionChunkResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CodeExecutionConfig,
    CodeExecutionPermission,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    DiffusionArchitecture,
    EmbeddingArchitecture,
    EmbeddingRequest,
    File,
    FileSource,
    ImageChoice,
    ImageGenerationResponse,
    ImageGenerationResponseFormat,
    InputFile,
    IsqOrganization,
    LoraAdapter,
    LoraAdapterError,
    LoraAdapterGeneration,
    McpClientConfigPy,
    McpServerConfigPy,
    McpServerSourcePy,
    Message,
    ModelDType,
    MultimodalArchitecture,
    MultimodalAutoMapParams,
    PagedCacheType,
    ResponseMessage,
    Role,
    SandboxPolicy,
    SpeechLoaderType,
    TextAutoMapParams,
    ToolCallResponse,
    ToolCallType,
    ToolChoice,
    Usage,
    VisionArchitecture,
    VisionAutoMapParams,
    WebSearchOptions,
    WebSearchUserLocation,
    Which,
    WhichVariant,
    chat_request_from_openai,
    completion_request_from_openai,
    embedding_request_from_openai,
    from_json_dict,
    normalize_embedding_input,
    normalize_messages,
    parse_enum,
    to_json_dict,
    validate_chat_request,
    validate_completion_request,
    validate_embedding_request,
)
from mistralrs_core.api import enums as enums_mod

# ---------------------------------------------------------------- enums


def test_architecture_has_every_upstream_member():
    names = (
        "Mistral Gemma Mixtral Llama Phi2 Phi3 Qwen2 Gemma2 Starcoder2 Phi3_5MoE DeepseekV2 "
        "DeepseekV3 Qwen3 GLM4 GLM4Moe GLM4MoeLite Qwen3Moe SmolLm3 GraniteMoeHybrid GptOss "
        "Qwen3Next Lfm2 Lfm2Moe"
    ).split()
    for name in names:
        assert isinstance(getattr(Architecture, name), Architecture)


def test_vision_architecture_spec_and_upstream_spellings():
    spec = (
        "Phi3V Idefics2 LLaVaNext LLaVa VLlama Qwen2VL Idefics3 MiniCpmO Phi4MM Qwen2_5VL "
        "Gemma3 Mistral3 Llama4 Gemma3n Qwen3VL"
    ).split()
    upstream = "LLaVANext LLaVA Lfm2Vl Qwen3VLMoE Qwen3_5 Qwen3_5Moe Voxtral Gemma4".split()
    for name in spec + upstream:
        assert isinstance(getattr(VisionArchitecture, name), VisionArchitecture)
    assert VisionArchitecture.LLaVaNext is VisionArchitecture.LLaVANext
    assert VisionArchitecture.LLaVa is VisionArchitecture.LLaVA
    assert MultimodalArchitecture is VisionArchitecture


def test_small_enums():
    assert [m.name for m in DiffusionArchitecture] == ["Flux", "FluxOffloaded"]
    assert [m.name for m in EmbeddingArchitecture] == ["EmbeddingGemma", "Qwen3Embedding"]
    assert [m.name for m in SpeechLoaderType] == ["Dia"]
    assert [m.name for m in ModelDType] == ["Auto", "BF16", "F16", "F32"]
    assert IsqOrganization.Default.value == "default" and IsqOrganization.MoQE.value == "moqe"
    assert PagedCacheType.Auto.value == 0 and PagedCacheType.F8E4M3.value == 1
    assert ToolChoice.NoTools.value == "None" and ToolChoice.Auto.value == "Auto"
    assert not hasattr(ToolChoice, "Required")
    assert {m.name for m in ImageGenerationResponseFormat} == {"Url", "B64Json"}
    assert ToolCallType.Function.value == "function"
    assert [r.value for r in (Role.User, Role.Assistant, Role.System, Role.Tool)] == [
        "user",
        "assistant",
        "system",
        "tool",
    ]
    assert CodeExecutionPermission is mistralrs.AgentPermission


@pytest.mark.parametrize(
    ("cls", "text", "member"),
    [
        (Architecture, "llama", Architecture.Llama),
        (Architecture, "PHI3_5MOE", Architecture.Phi3_5MoE),
        (Architecture, "phi3.5moe", Architecture.Phi3_5MoE),
        (VisionArchitecture, "llava-next", VisionArchitecture.LLaVANext),
        (DiffusionArchitecture, "flux_offloaded", DiffusionArchitecture.FluxOffloaded),
        (IsqOrganization, "moqe", IsqOrganization.MoQE),
        (ModelDType, "BF16", ModelDType.BF16),
        (PagedCacheType, "f8e4m3", PagedCacheType.F8E4M3),
        (PagedCacheType, 1, PagedCacheType.F8E4M3),
        (ToolChoice, "none", ToolChoice.NoTools),
        (ImageGenerationResponseFormat, "b64json", ImageGenerationResponseFormat.B64Json),
        (ImageGenerationResponseFormat, "b64_json", ImageGenerationResponseFormat.B64Json),
        (Role, Role.Tool, Role.Tool),
    ],
)
def test_parse_enum_accepts_spellings(cls, text, member):
    assert parse_enum(cls, text, "f") is member


def test_parse_enum_error_names_field_and_choices():
    with pytest.raises(ValueError) as err:
        parse_enum(Architecture, "gpt9", "arch")
    message = str(err.value)
    assert message.startswith("arch: ")
    assert "'gpt9'" in message and "Llama" in message and "Phi3_5MoE" in message
    with pytest.raises(ValueError, match=r"^dtype: "):
        parse_enum(ModelDType, 3.5, "dtype")
    with pytest.raises(ValueError, match=r"^arch: .*Flux"):
        parse_enum(SpeechLoaderType, DiffusionArchitecture.Flux, "arch")


def test_enum_spellings_never_collide():
    # The spelling-insensitive key must not map two distinct members together.
    classes = [
        cls
        for cls in vars(enums_mod).values()
        if isinstance(cls, type) and issubclass(cls, enums_mod.enum.Enum)
        and cls.__module__ == enums_mod.__name__
    ]
    assert len(classes) >= 15
    for cls in classes:
        seen: dict = {}
        for name, member in cls.__members__.items():
            for text in (name, member.value):
                if isinstance(text, str):
                    key = enums_mod._key(text)
                    assert seen.setdefault(key, member) is member, (cls, text)


# ---------------------------------------------------------------- Which

Q = dict(quantized_model_id="q", quantized_filename="f")
MINIMAL = {
    "Plain": dict(model_id="m"),
    "XLora": dict(xlora_model_id="x", order="o.json"),
    "Lora": dict(adapter_model_id="a"),
    "GGUF": dict(quantized_model_id="q", quantized_filename="f.gguf"),
    "XLoraGGUF": dict(Q, xlora_model_id="x", order="o"),
    "LoraGGUF": dict(Q, adapters_model_id="a", order="o"),
    "GGML": dict(quantized_model_id="q", quantized_filename="f.bin"),
    "XLoraGGML": dict(Q, xlora_model_id="x", order="o"),
    "LoraGGML": dict(Q, adapters_model_id="a", order="o"),
    "Embedding": dict(model_id="m"),
    "VisionPlain": dict(model_id="m", arch=VisionArchitecture.Phi3V),
    "DiffusionPlain": dict(model_id="m", arch=DiffusionArchitecture.Flux),
    "Speech": dict(model_id="m", arch=SpeechLoaderType.Dia),
}
KINDS = {
    "Embedding": "embedding",
    "VisionPlain": "vision",
    "DiffusionPlain": "diffusion",
    "Speech": "speech",
}


@pytest.mark.parametrize("variant", sorted(MINIMAL))
def test_every_which_variant_with_defaults(variant):
    cls = getattr(Which, variant)
    obj = cls(**MINIMAL[variant])
    assert isinstance(obj, Which) and isinstance(obj, WhichVariant)
    assert obj.variant == variant
    assert obj.kind == KINDS.get(variant, "text")
    assert obj.dtype is ModelDType.Auto
    for att in attrs.fields(cls):
        if att.name in MINIMAL[variant] or att.name == "dtype":
            continue
        default = att.default.factory() if isinstance(att.default, attrs.Factory) else att.default
        assert getattr(obj, att.name) == default
    assert cls.__qualname__ == f"Which.{variant}"
    assert repr(obj).startswith(f"Which.{variant}(")
    # Multi-model configs are stored as JSON: every variant must round-trip.
    assert from_json_dict(json.loads(json.dumps(to_json_dict(obj))), cls) == obj


def test_which_spec_field_order_and_defaults():
    names = [a.name for a in attrs.fields(Which.Plain) if not a.kw_only]
    assert names == [
        "model_id", "arch", "tokenizer_json", "topology", "organization", "from_uqff",
        "write_uqff", "dtype", "auto_map_params", "calibration_file", "imatrix", "hf_cache_path",
    ]
    names = [a.name for a in attrs.fields(Which.VisionPlain) if not a.kw_only]
    assert names == [
        "model_id", "arch", "tokenizer_json", "topology", "from_uqff", "write_uqff", "dtype",
        "max_edge", "auto_map_params", "calibration_file", "imatrix", "hf_cache_path",
    ]
    names = [a.name for a in attrs.fields(Which.GGUF) if not a.kw_only]
    assert names == [
        "quantized_model_id", "quantized_filename", "tok_model_id", "topology", "dtype",
        "auto_map_params",
    ]
    assert Which.GGML("q", "f").gqa is None
    assert Which.Speech("m", "dia").dac_model_id is None


def test_which_coercions_and_aliases():
    plain = Which.Plain("m", "llama", organization="moqe", dtype="bf16", from_uqff=("a", "b"))
    assert plain.arch is Architecture.Llama
    assert plain.organization is IsqOrganization.MoQE
    assert plain.dtype is ModelDType.BF16
    assert plain.from_uqff == ["a", "b"]
    assert Which.Plain(pathlib.Path("/tmp/model")).model_id == "/tmp/model"
    assert Which.GGUF("q", ["a.gguf", "b.gguf"]).quantized_filename == ["a.gguf", "b.gguf"]
    assert Which.Plain("m", auto_map_params=(None,)).auto_map_params is None
    assert Which.MultimodalPlain is Which.VisionPlain
    assert Which.VisionPlain("m", "phi4mm").arch is VisionArchitecture.Phi4MM
    assert Which.Speech("m", "Dia").arch is SpeechLoaderType.Dia
    gguf = Which.GGUF("q", "f", tokenizer_json="t.json", organization="default", hf_cache_path="/c")
    assert gguf.tokenizer_json == "t.json" and gguf.organization is IsqOrganization.Default
    params = TextAutoMapParams()
    assert (params.max_seq_len, params.max_batch_size) == (4096, 1)
    vparams = VisionAutoMapParams()
    assert (vparams.max_num_images, vparams.max_image_length) == (1, 1024)
    assert MultimodalAutoMapParams is VisionAutoMapParams
    assert Which.VisionPlain("m", "gemma3", auto_map_params=vparams).auto_map_params is vparams


def test_which_errors():
    with pytest.raises(TypeError, match="not constructible"):
        Which()
    with pytest.raises(ValueError, match=r"^arch: "):
        Which.Plain("m", arch="gpt9")
    with pytest.raises(ValueError, match=r"^arch: "):
        Which.Speech("m", DiffusionArchitecture.Flux)
    with pytest.raises(TypeError, match="model_id"):
        Which.Plain(3)
    with pytest.raises(TypeError, match="quantized_filename"):
        Which.GGUF("q", [])
    with pytest.raises(TypeError, match="auto_map_params"):
        Which.Plain("m", auto_map_params=VisionAutoMapParams())
    with pytest.raises(ValueError, match=r"^adapter_model_id: "):
        Which.Lora()
    lora = Which.Lora(model_id="base", adapters=[LoraAdapter("a", "/adapters/a")])
    assert lora.adapter_kind == "lora" and lora.max_adapters == 16


def test_spec_legacy_mistral_gguf_example():
    which = Which.MistralGGUF(
        tok_model_id="mistralai/Mistral-7B-Instruct-v0.1",
        quantized_model_id="TheBloke/Mistral-7B-Instruct-v0.1-GGUF",
        quantized_filename="mistral-7b-instruct-v0.1.Q4_K_M.gguf",
        tokenizer_json=None,
        repeat_last_n=64,
    )
    assert isinstance(which, Which.GGUF)
    assert which.weights_format == "gguf"


# ---------------------------------------------------------------- config


def test_config_classes():
    moe = AnyMoeConfig(
        hidden_size=3072,
        dataset_json="d.json",
        prefix="model.layers",
        mlp="mlp",
        model_ids=["a"],
        expert_type=AnyMoeExpertType.LoraAdapter(rank=8, alpha=16.0, target_modules=["q"]),
    )
    assert (moe.layers, moe.lr, moe.epochs) == ([], 1e-3, 100)
    assert (moe.batch_size, moe.training) == (4, True)
    assert AnyMoeExpertType.FineTuned() == AnyMoeExpertType.FineTuned()
    policy = SandboxPolicy()
    assert (policy.max_memory_mb, policy.max_cpu_secs) == (2048, 300)
    assert policy.network.value == "loopback" and policy.extra_env == []
    code = CodeExecutionConfig()
    assert (code.python_path, code.timeout_secs) == ("python3", 60)
    assert mistralrs.ShellConfig().timeout_secs == 600
    err = LoraAdapterError("gone", code="not_found")
    assert isinstance(err, ValueError) and err.code == "not_found"
    assert LoraAdapterGeneration(3).generation == 3


def test_spec_mcp_example():
    http_server = McpServerConfigPy(
        id="web_search",
        name="Web Search MCP",
        source=McpServerSourcePy.Http(
            url="https://api.example.com/mcp", timeout_secs=30, headers={"X-API-Version": "v1"}
        ),
        enabled=True,
        tool_prefix="web",
        resources=None,
        bearer_token="your-api-token",
    )
    process_server = McpServerConfigPy(
        id="filesystem",
        name="Filesystem MCP",
        source=McpServerSourcePy.Process(
            command="mcp-server-filesystem", args=["--root", "/tmp"], work_dir=None,
            env={"MCP_LOG_LEVEL": "debug"},
        ),
        tool_prefix="fs",
        resources=["file://**"],
    )
    ws = McpServerConfigPy(
        id="rt", name="RT", source=McpServerSourcePy.WebSocket("wss://x/mcp", 60, None)
    )
    config = McpClientConfigPy(
        servers=[http_server, process_server, ws],
        auto_register_tools=True,
        tool_timeout_secs=30,
        max_concurrent_calls=5,
    )
    assert config.servers[1].source.transport == "process"
    assert to_json_dict(config)["servers"][0]["source"]["headers"] == {"X-API-Version": "v1"}


def test_web_search_location_constructor_and_field():
    loc = ApproximateUserLocation(city="Paris", country="FR", region="IDF", timezone="Europe/Paris")
    where = WebSearchUserLocation.approximate(loc)
    assert where.approximate is loc and where.type == "approximate"
    opts = WebSearchOptions(search_context_size="high", user_location=where)
    assert opts.search_context_size is mistralrs.SearchContextSize.High


def test_input_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,b\n1,2\n")
    from_path = InputFile.from_path(path)
    assert (from_path.name, from_path.mime_type) == ("data.csv", "text/csv")
    assert from_path.data == b"a,b\n1,2\n"
    from_text = InputFile.from_text("notes.txt", "hi")
    assert from_text.data == b"hi" and from_text.mime_type == "text/plain"


# ---------------------------------------------------------------- requests


def test_spec_chat_examples():
    req = ChatCompletionRequest(
        model="mistral",
        messages=[Message(Role.User, "Tell me a story about the Rust type system.")],
        max_tokens=256,
        presence_penalty=1.0,
        top_p=0.1,
        temperature=0.1,
    )
    assert validate_chat_request(req) is req
    assert normalize_messages(req.messages) == [
        {"role": "user", "content": "Tell me a story about the Rust type system."}
    ]
    multimodal = ChatCompletionRequest(
        model="default",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "audio_url", "audio_url": {"url": "https://x/a.ogg"}},
                    {"type": "image_url", "image_url": {"url": "https://x/b.jpg"}},
                    {"type": "text", "text": "<|audio_1|><|image_1|> Describe."},
                ],
            }
        ],
        max_tokens=256,
        temperature=0.2,
        top_p=0.9,
    )
    validate_chat_request(multimodal)
    # The spec's multi-model examples omit `model`.
    hello = ChatCompletionRequest(messages=[{"role": "user", "content": "Hello!"}])
    assert hello.model == "default"


def test_chat_defaults_and_positional_order():
    req = ChatCompletionRequest("prompt text", "m", True, 2)
    assert (req.messages, req.model, req.logprobs, req.n_choices) == ("prompt text", "m", True, 2)
    assert req.stream is False and req.truncate_sequence is False and req.ignore_eos is False
    spec_order = [
        "messages", "model", "logprobs", "n_choices", "logit_bias", "top_logprobs", "max_tokens",
        "presence_penalty", "frequency_penalty", "stop_token_ids", "temperature", "top_p",
        "top_k", "stream",
    ]
    assert [a.name for a in attrs.fields(ChatCompletionRequest)][:14] == spec_order
    assert attrs.fields_dict(ChatCompletionRequest)["adapter"].kw_only
    req = ChatCompletionRequest([], stop_seqs="END", tool_choice="auto", grammar={"type": "object"})
    assert req.stop_seqs == ["END"] and req.tool_choice is ToolChoice.Auto
    assert json.loads(req.grammar) == {"type": "object"}


def test_completion_and_embedding_defaults():
    comp = CompletionRequest("Once upon", "m")
    assert (comp.best_of, comp.echo_prompt, comp.n_choices, comp.suffix) == (1, False, 1, None)
    first = [a.name for a in attrs.fields(CompletionRequest)][:4]
    assert first == ["prompt", "model", "best_of", "echo_prompt"]
    validate_completion_request(comp)
    emb = EmbeddingRequest(
        input=["task: query | text: superconductors", "task: query | text: graphene"],
        truncate_sequence=True,
    )
    validate_embedding_request(emb)
    assert normalize_embedding_input("a") == ["a"]
    assert normalize_embedding_input([1, 2]) == [[1, 2]]
    assert normalize_embedding_input([[1], [2, 3]]) == [[1], [2, 3]]


def test_normalize_messages_keeps_extras():
    messages = [
        {"role": Role.System, "content": "be brief"},
        Message("assistant", None, tool_calls=[{"id": "c"}]),
        {"role": "tool", "content": "42", "tool_call_id": "c"},
        {"role": "assistant"},
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c"},
        {"role": "assistant", "content": None},
    ]
    with pytest.raises(ValueError, match=r"^messages\[0\]: "):
        normalize_messages([3])


USER = [{"role": "user", "content": "hi"}]

CHAT_ERRORS = [
    (dict(max_tokens=-3), "max_tokens: must be >= 1, got -3"),
    (dict(max_tokens="5"), "max_tokens: must be an integer"),
    (dict(temperature=-0.5), "temperature: must be >= 0"),
    (dict(temperature=float("nan")), "temperature: must be a finite number"),
    (dict(top_p=0.0), "top_p: must be > 0"),
    (dict(top_p=1.5), "top_p: must be <= 1"),
    (dict(top_k=-1), "top_k: must be >= 0"),
    (dict(min_p=1.5), "min_p: must be <= 1"),
    (dict(n_choices=0), "n_choices: must be >= 1"),
    (dict(top_logprobs=21, logprobs=True), "top_logprobs: must be <= 20"),
    (dict(top_logprobs=2), "top_logprobs: requires logprobs=True"),
    (dict(presence_penalty=2.5), "presence_penalty: must be <= 2"),
    (dict(frequency_penalty=-3), "frequency_penalty: must be >= -2"),
    (dict(repetition_penalty=0), "repetition_penalty: must be > 0"),
    (dict(messages=[]), "messages: must not be empty"),
    (dict(messages=""), "messages: must not be empty"),
    (dict(messages=42), "messages: must be a list"),
    (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role: must be one of"),
    (dict(messages=[5]), "messages[0]: must be a dict or Message"),
    (dict(messages=[{"role": "user"}]), "messages[0].content: missing"),
    (dict(messages=[{"role": "user", "content": 3}]), "messages[0].content: must be a string"),
    (
        dict(messages=[{"role": "user", "content": []}]),
        "messages[0].content: must not be an empty list",
    ),
    (
        dict(messages=[{"role": "user", "content": [{"type": "pdf"}]}]),
        "messages[0].content[0].type: must be one of text, image_url, audio_url, input_audio, video_url",
    ),
    (
        dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        "messages[0].content[0]: a image_url part needs",
    ),
    (
        dict(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": []}}]}]),
        "messages[0].content[0].video_url: a frame list must hold non-empty URL strings",
    ),
    (
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ["a"]}}]}]),
        "messages[0].content[0].image_url: must be a URL string",
    ),
    (
        dict(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": "u"}]}]),
        "messages[0].content[0].type: image_url parts are only allowed in user messages",
    ),
    (dict(grammar="a+"), "grammar_type: grammar and grammar_type must be set together"),
    (dict(grammar_type="regex"), "grammar: grammar and grammar_type must be set together"),
    (dict(grammar="a", grammar_type="ebnf"), "grammar_type: must be one of regex, lark"),
    (
        dict(grammar="{nope", grammar_type="json_schema"),
        "grammar: a json_schema grammar is not valid JSON",
    ),
    (dict(logit_bias={"x": 1.0}), "logit_bias['x']: key must be a token id"),
    (dict(logit_bias={5: 101}), "logit_bias[5]: must be <= 100"),
    (dict(logit_bias=[1]), "logit_bias: must be a dict"),
    (dict(stop_seqs=["ok", ""]), "stop_seqs[1]: must not be empty"),
    (dict(stop_seqs=[3]), "stop_seqs[0]: must be a string"),
    (dict(stop_token_ids=[-1]), "stop_token_ids[0]: must be a token id"),
    (dict(dry_multiplier=-1), "dry_multiplier: must be >= 0"),
    (dict(dry_base=0.5), "dry_base: must be >= 1"),
    (dict(dry_allowed_length=-2), "dry_allowed_length: must be >= 0"),
    (dict(dry_sequence_breakers="\n"), "dry_sequence_breakers: must be a list of strings"),
    (dict(tool_schemas=["{bad"]), "tool_schemas[0]: the tool schema is not valid JSON"),
    (dict(tool_schemas=["[1]"]), "tool_schemas[0]: must be a JSON object"),
    (dict(reasoning_effort="extreme"), "reasoning_effort: must be one of off"),
    (dict(reasoning_effort="high", enable_thinking=False), "reasoning_effort: 'high' contradicts"),
    (dict(reasoning_effort="off", enable_thinking=True), "reasoning_effort: 'off' contradicts"),
    (dict(stream="yes"), "stream: must be a bool"),
    (dict(max_tool_rounds=0), "max_tool_rounds: must be >= 1"),
    (dict(web_search_options={"a": 1}), "web_search_options: must be a WebSearchOptions"),
    (dict(files=["x"]), "files[0]: must be a RequestedFile"),
    (dict(model=None), "model: must be a string"),
    (dict(adapter=""), "adapter: must not be empty"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"), CHAT_ERRORS, ids=[m.split(":")[0] for _, m in CHAT_ERRORS]
)
def test_chat_validation_names_the_field(kwargs, message):
    kwargs = {"messages": USER, **kwargs}
    with pytest.raises(ValueError) as err:
        validate_chat_request(ChatCompletionRequest(**kwargs))
    assert str(err.value).startswith(message)


def test_chat_validation_accepts_edge_values():
    ok = [
        dict(top_k=0, temperature=0, top_p=1.0, min_p=0.0),
        dict(logprobs=True, top_logprobs=0),
        dict(logit_bias={"50256": -100, 7: 100.0}),
        dict(grammar="[a-z]+", grammar_type="regex"),
        dict(grammar='{"grammars": []}', grammar_type="llguidance"),
        dict(reasoning_effort="high", enable_thinking=True),
        dict(reasoning_effort="none", enable_thinking=False),
        dict(messages=[{"role": "assistant", "content": None, "tool_calls": []}, *USER]),
        dict(messages=[{"role": "developer", "content": [{"type": "text", "text": "x"}]}]),
        dict(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": "u"}]}]),
        dict(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": ["a", "b"]}}]}]),
        dict(messages="<s>[INST] hi [/INST]"),
        dict(tool_schemas=[{"type": "function", "function": {"name": "f"}}]),
        dict(dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_sequence_breakers=["\n"]),
    ]
    for kwargs in ok:
        validate_chat_request(ChatCompletionRequest(**{"messages": USER, **kwargs}))


def test_message_role_is_checked_on_construction():
    with pytest.raises(ValueError, match=r"^role: "):
        Message("robot", "x")


def test_completion_validation():
    with pytest.raises(ValueError, match=r"^best_of: must be >= n_choices \(3\), got 2"):
        validate_completion_request(CompletionRequest("p", best_of=2, n_choices=3))
    with pytest.raises(ValueError, match=r"^prompt: must not be empty"):
        validate_completion_request(CompletionRequest(""))
    with pytest.raises(ValueError, match=r"^suffix: must be a string"):
        validate_completion_request(CompletionRequest("p", suffix=3))
    with pytest.raises(ValueError, match=r"^temperature: must be >= 0"):
        validate_completion_request(CompletionRequest("p", temperature=-1))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "input: must be a non-empty"),
        ("", "input: must not be empty"),
        ([1, -1], "input[1]: must be a token id"),
        ([2**32], "input[0]: must be a token id"),
        ([[1], []], "input[1]: must be a non-empty list"),
        (["a", 1], "input[1]: must be a string"),
        ([None], "input[0]: must be a string, a token id"),
        (3, "input: must be a non-empty"),
    ],
)
def test_embedding_validation(value, message):
    with pytest.raises(ValueError) as err:
        validate_embedding_request(EmbeddingRequest(value))
    assert str(err.value).startswith(message)


# ---------------------------------------------------------------- responses + JSON


def _chat_response() -> ChatCompletionResponse:
    call = ToolCallResponse(0, "call_1", ToolCallType.Function, CalledFunction("f", '{"x": 1}'))
    message = ResponseMessage(content=None, role="assistant", tool_calls=[call])
    usage = Usage(completion_tokens=3, prompt_tokens=5, total_tokens=8)
    choices = [Choice("tool_calls", 0, message)]
    return ChatCompletionResponse("chatcmpl-1", choices, 1700000000, "m", usage=usage)


def test_chat_response_json_shape():
    resp = _chat_response()
    data = to_json_dict(resp)
    assert data["object"] == "chat.completion"
    assert data["system_fingerprint"] == "local"
    choice = data["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"]["content"] is None  # kept: OpenAI sends content: null
    assert "reasoning_content" not in choice["message"]
    call = choice["message"]["tool_calls"][0]
    function = {"name": "f", "arguments": '{"x": 1}'}
    assert call == {"index": 0, "id": "call_1", "type": "function", "function": function}
    assert "tp" not in call
    assert data["usage"]["total_tokens"] == 8 and "avg_tok_per_sec" in data["usage"]
    for extra in ("adapter_generation", "agentic_tool_calls", "files", "session_id"):
        assert extra not in data
    json.dumps(data)
    assert from_json_dict(data, ChatCompletionResponse) == resp
    assert resp.choices[0].message.tool_calls[0].type is ToolCallType.Function


def test_chunk_completion_image_shapes():
    chunk = ChatCompletionChunkResponse("c", [ChunkChoice(None, 0, Delta(content="Hel"))], 1, "m")
    data = to_json_dict(chunk)
    assert data["object"] == "chat.completion.chunk"
    assert data["choices"][0]["finish_reason"] is None
    assert data["choices"][0]["delta"] == {"content": "Hel", "role": "assistant"}
    assert "usage" not in data
    comp = CompletionResponse("cmpl", [CompletionChoice("length", 0, "text")], 1, "m")
    assert to_json_dict(comp)["object"] == "text_completion"
    img = ImageGenerationResponse([ImageChoice(url="file:///x.png")], 1)
    assert to_json_dict(img) == {"data": [{"url": "file:///x.png"}], "created": 1}
    assert img.choices is img.data


def test_file_helpers(tmp_path):
    source = FileSource("execute_python", 1, 0)
    f = File("file_1", "out.txt", "txt", "text/plain", 2, source, text="hi")
    assert f.is_text() and not f.is_binary() and not f.is_image() and not f.is_truncated()
    f.save(tmp_path / "o.txt")
    assert (tmp_path / "o.txt").read_text() == "hi"


def test_request_json_skips_callables_and_encodes_bytes():
    req = ChatCompletionRequest(
        [Message(Role.User, "hi")],
        agent_approval_callback=lambda approval: True,
        input_files=[InputFile("a.bin", b"\x00\x01")],
    )
    data = to_json_dict(req)
    assert "agent_approval_callback" not in data
    assert data["messages"] == [{"role": "user", "content": "hi"}]
    assert data["input_files"][0]["data"] == "AAE="
    back = from_json_dict(data, ChatCompletionRequest)
    assert back.input_files == req.input_files
    assert back.messages == [{"role": "user", "content": "hi"}]
    with_adapter = ChatCompletionRequest(USER, adapter=LoraAdapterGeneration(2))
    assert from_json_dict(to_json_dict(with_adapter), ChatCompletionRequest) == with_adapter
    assert to_json_dict(Which.Plain("m", "llama"))["arch"] == "llama"


# ---------------------------------------------------------------- OpenAI bodies


def test_chat_request_from_openai_mapping():
    body = {
        "model": "gpt-x",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "n": 2,
        "stop": "END",
        "max_completion_tokens": 64,
        "temperature": 0.5,
        "logit_bias": {"42": 3},
        "seed": 7,
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
        "user": "ignored",
        "top_p": None,
    }
    req = chat_request_from_openai(body)
    assert (req.model, req.n_choices, req.stop_seqs, req.max_tokens) == ("gpt-x", 2, ["END"], 64)
    assert req.logit_bias == {42: 3} and req.seed == 7 and req.stream is True and req.top_p is None
    assert json.loads(req.tool_schemas[0])["function"]["name"] == "f"
    assert req.tool_choice is ToolChoice.Auto and req.tool_choice_openai is None
    assert req.grammar_type == "json_schema" and json.loads(req.grammar) == {"type": "object"}
    assert req.messages is not body["messages"]
    required = chat_request_from_openai({"messages": USER, "tool_choice": "required"})
    assert required.tool_choice is ToolChoice.Auto and required.tool_choice_openai == "required"
    no_tools = chat_request_from_openai({"messages": USER, "tool_choice": "none"})
    assert no_tools.tool_choice is ToolChoice.NoTools
    regex = {"type": "regex", "value": "a+"}
    grammar = chat_request_from_openai({"messages": USER, "grammar": regex})
    assert (grammar.grammar_type, grammar.grammar) == ("regex", "a+")
    search = chat_request_from_openai(
        {
            "messages": USER,
            "web_search_options": {
                "search_context_size": "medium",
                "user_location": {"type": "approximate", "approximate": {"city": "Oslo"}},
            },
        }
    )
    assert search.web_search_options.user_location.approximate.city == "Oslo"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": "hi"}, "messages: must be a list"),
        ({"messages": USER, "n": "2"}, "n: must be an integer"),
        ({"messages": USER, "n": 0}, "n: must be >= 1"),
        ({"messages": USER, "stop": [1]}, "stop: must be a list of strings"),
        ({"messages": USER, "stop": ["a", ""]}, "stop[1]: must not be empty"),
        ({"messages": USER, "temperature": "hot"}, "temperature: must be a number"),
        ({"messages": USER, "stream": 1}, "stream: must be a boolean"),
        ({"messages": USER, "logit_bias": {"a": 1}}, "logit_bias: key 'a' is not a token id"),
        ({"messages": USER, "tools": [{"type": "web"}]}, "tools[0]: must be an object with type"),
        ({"messages": USER, "tool_choice": "maybe"}, "tool_choice: must be"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type: must be"),
        (
            {
                "messages": USER,
                "response_format": {"type": "json_object"},
                "grammar": {"type": "regex", "value": "a"},
            },
            "grammar: cannot be combined",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: must be one of"),
        (
            {"messages": USER, "web_search_options": {"search_context_size": "huge"}},
            "web_search_options.search_context_size: must be",
        ),
        ([1], "body: must be a JSON object"),
    ],
)
def test_chat_request_from_openai_errors(body, message):
    with pytest.raises(ValueError) as err:
        chat_request_from_openai(body)
    assert str(err.value).startswith(message)


def test_completion_and_embedding_from_openai():
    req = completion_request_from_openai(
        {"prompt": ["Once"], "echo": True, "best_of": 2, "n": 2, "max_tokens": 4, "logprobs": 3}
    )
    assert (req.prompt, req.echo_prompt, req.max_tokens) == ("Once", True, 4)
    assert (req.best_of, req.n_choices) == (2, 2)
    with pytest.raises(ValueError, match=r"^prompt: "):
        completion_request_from_openai({"prompt": [1, 2]})
    with pytest.raises(ValueError, match=r"^best_of: must be >= n_choices"):
        completion_request_from_openai({"prompt": "p", "n": 3, "best_of": 2})
    # best_of=1 (the default) means "as many as n".
    assert completion_request_from_openai({"prompt": "p", "n": 3}).n_choices == 3
    body = {"input": ["a", "b"], "model": "e", "encoding_format": "float"}
    emb = embedding_request_from_openai(body)
    assert (emb.input, emb.model) == (["a", "b"], "e")
    with pytest.raises(ValueError, match=r"^input: missing"):
        embedding_request_from_openai({})
    with pytest.raises(ValueError, match=r"^input\[0\]: must be a token id"):
        embedding_request_from_openai({"input": [-5]})


def test_public_names_exported():
    for name in mistralrs.__all__:
        assert hasattr(mistralrs, name), name
    for name in ("Which", "ChatCompletionRequest", "Message", "Role", "VisionArchitecture",
                 "MultimodalArchitecture", "TextAutoMapParams", "AnyMoeConfig", "PagedCacheType",
                 "ImageGenerationResponseFormat", "McpClientConfigPy", "EmbeddingRequest"):
        assert name in mistralrs.__all__
