"""``Runner``: the SDK's entry point, holding one or more loaded models.

Multi-model design: a Runner keeps a table ``model_id -> ModelSlot``. The constructor
loads ``which`` (or each element of a list of ``Which``) under its model id (the
``model_id`` / ``quantized_model_id`` of the variant, made unique with ``-2``, ``-3``
...); ``add_model`` loads more later. The first model is the default. Each slot keeps
its ``Which`` and load options, so ``unload_model`` frees the engine and weights while
``reload_model`` (or any request routed to it) rebuilds them.
"""
from __future__ import annotations

import gc
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from mistralrs_core import capabilities
from mistralrs_core.agent.loop import Agent, Toolbox
from mistralrs_core.api.which import WhichVariant  # noqa: F401
from mistralrs_core.errors import NotAvailableYet, WrongModelKind
from mistralrs_core.heap import release_free_heap
from mistralrs_core.loading.options import LoadOptions
from mistralrs_core.pipeline.base import TEXT_KINDS, TOKENIZER_KINDS, kind_of
from mistralrs_core.plugins import get_plugin_manager, get_registry, installed_plugins
from mistralrs_core.progress import check_setting as check_progress_setting
from mistralrs_core.progress import scope as progress_scope
from mistralrs_core.tools import attach_tool_providers

if TYPE_CHECKING:
    from mistralrs_core.api import (AnyMoeConfig, ChatCompletionChunkResponse, ChatCompletionRequest,
                                    CompletionRequest, CompletionResponse, EmbeddingRequest,
                                    ImageGenerationResponse, ImageGenerationResponseFormat,
                                    PagedCacheType, SpeechGenerationResponse, Which)

log = logging.getLogger("mistralrs")


class ModelSlot:
    def __init__(self, model_id: str, which, opts: LoadOptions):
        self.model_id = model_id
        self.which = which
        self.opts = opts
        self.pipeline = None
        self.status = "unloaded"
        self.lock = threading.RLock()
        self.speculation = None   # SpeculativeConfig: a drafter attached at every (re)load
        self.anymoe = None        # AnyMoeSetup: the model's MLPs made experts at every (re)load


def _which_model_id(which) -> str:
    for attr in ("model_id", "quantized_model_id", "xlora_model_id", "adapter_model_id"):
        v = getattr(which, attr, None)
        if v:
            return str(v)
    return "default"


def load_pipeline(which, opts: LoadOptions, name: str):
    """Find the loader for ``which`` through the plugins and load it.

    The load runs in a short-lived thread. Loading does large parallel tensor work, and
    with libgomp (torch's OpenMP on Linux) the thread that does it keeps a team of pool
    threads for as long as it lives. While two such teams exist (the caller's and the
    engine thread's) and together outnumber the cores, libgomp stops spinning between
    parallel regions, so every region of a decode step pays a futex wake-up: a measured
    2.4x slower SmolLM2 decode (26 vs 63 tok/s on 2 cores). A team dies with its thread.
    """
    box: dict = {}

    def work():
        try:
            with progress_scope(opts.progress):
                box["pipeline"] = _load_pipeline(which, opts, name)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, name=f"mistralrs-load-{name}")
    t.start()
    t.join()
    # The load's temporaries (tokenizer build, header parse) are freed by now, but their
    # pages would stay resident in malloc's arenas.
    release_free_heap()
    if "error" in box:
        raise box["error"]
    return box["pipeline"]


def _load_pipeline(which, opts: LoadOptions, name: str):
    if not isinstance(which, WhichVariant):
        raise ValueError(f"which: expected a Which.* variant, got {type(which).__name__}")
    kind = getattr(which, "kind", "text")
    pm = get_plugin_manager()
    loader_name = pm.hook.mistralrs_select_loader(which=which, kind=kind)
    if loader_name is None:
        dist = capabilities.distribution_for_kind(kind)
        raise NotAvailableYet(
            f"Which.{type(which).__name__}",
            (f"install {dist}; " if dist else "") +
            f"no installed plugin loads it; installed plugins: {', '.join(installed_plugins())}")
    if opts.quant_kernel not in (None, "auto") and getattr(which, "weights_format", "") not in ("gguf", "ggml"):
        raise ValueError(f"quant_kernel: {opts.quant_kernel!r} selects a kernel for GGUF/GGML weights; "
                         f"Which.{type(which).__name__} loads none")
    entry = get_registry().loaders.get(loader_name.lower())
    if entry is None:
        raise ValueError(f"loader {loader_name!r} was selected but is not registered")
    _check_quant_args(which, opts, loader_name)
    loader = entry.load()()
    from mistralrs_core.distributed import placement
    # Device maps (num_device_layers, auto_map_params, topology devices) and tensor-parallel
    # sharding apply to the models this load builds (CausalLM.load_weights asks for them).
    with placement.loading(placement.request_from(which, opts)):
        return loader.load(which, opts, name)


def _check_quant_args(which, opts, loader_name: str) -> None:
    """Topologies, UQFF and importance matrices are served for ``Which.Plain`` text models
    and ``Which.VisionPlain`` models (their loaders hand them to the quant plugin); any other
    loader would ignore them, so they are refused there. (``in_situ_quant`` is each loader's
    to take or refuse: the diffusion loader quantizes through the same hook, GGUF refuses it.)"""
    if loader_name.lower() in ("safetensors", "isq", "vision"):
        return
    from mistralrs_core.loading.model_loader import QUANT_WHICH_FIELDS
    variant = type(which).__name__
    for field in QUANT_WHICH_FIELDS:
        if getattr(which, field, None):
            raise NotAvailableYet(f"Which.{variant}({field}=...)", f"{field} serves Which.Plain text models")


def _check_paged_attn(paged_attn: bool, no_paged_attn: bool) -> None:
    """The KV cache is one paged block pool on every device, CPU included: there is no
    contiguous cache. ``paged_attn=True`` asks for what always happens; ``no_paged_attn=True``
    asks for a cache that does not exist, so it is refused rather than ignored."""
    if paged_attn and no_paged_attn:
        raise ValueError("paged_attn / no_paged_attn: both are set; they contradict each other")
    if no_paged_attn:
        raise NotAvailableYet("Runner(no_paged_attn=True) (a non-paged KV cache)",
                              "the KV cache is always a paged block pool here, on every device; "
                              "size it with pa_gpu_mem / pa_gpu_mem_usage / pa_ctxt_len instead")


def _check_limits(max_queue, request_timeout) -> None:
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
        raise ValueError(f"max_queue: must be an integer >= 0 or None, got {max_queue!r}")
    if request_timeout is not None and (isinstance(request_timeout, bool)
                                        or not isinstance(request_timeout, (int, float)) or not request_timeout > 0):
        raise ValueError(f"request_timeout: must be a number of seconds > 0 or None, got {request_timeout!r}")


class Runner:
    def __init__(
        self,
        which: Which | list[Which],
        max_seqs: int = 16,
        no_kv_cache: bool = False,
        prefix_cache_n: int = 16,
        token_source: str = "cache",
        speculative_gamma: int = 32,
        which_draft: Which | None = None,
        chat_template: str | None = None,
        jinja_explicit: str | None = None,
        num_device_layers: list[str] | None = None,
        in_situ_quant: str | None = None,
        anymoe_config: AnyMoeConfig | None = None,
        pa_gpu_mem: int | None = None,
        pa_gpu_mem_usage: float | None = None,
        pa_ctxt_len: int | None = None,
        pa_blk_size: int | None = None,
        pa_cache_type: PagedCacheType | str | None = None,
        no_paged_attn: bool = False,
        paged_attn: bool = False,
        seed: int | None = None,
        enable_search: bool = False,
        search_embedding_model: str | None = None,
        search_callback: Callable[[str], list[dict[str, str]]] | None = None,
        tool_callbacks: Mapping[str, Callable[[str, dict], str]] | None = None,
        mcp_client_config: Any = None,
        code_execution_config: Any = None,
        shell_config: Any = None,
        mtp_model: Any = None,
        mtp_n_predict: int | None = None,
        *,
        device: str | None = None,
        quant_kernel: str | None = None,
        max_queue: int | None = None,
        request_timeout: float | None = None,
        speculative_ngram: int | None = None,
        progress: bool | None = None,
    ) -> None:
        """Beyond the SDK (keyword-only): ``device`` ("cpu", "cuda:0"; default: CUDA when
        present) and ``quant_kernel``, the CPU kernel variant for GGUF/GGML weights: "auto"
        (default: exact float32 dots) or "vnni" (ggml's int8 dots where the CPU has AVX-512
        VNNI: faster, activations rounded to int8 as llama.cpp does, so numbers change).
        ``max_queue``: most sequences that may wait for a slot; a request beyond it raises
        ``QueueFull`` at once (default: no limit). ``request_timeout``: seconds a request may
        run before it ends with ``RequestTimedOut`` (default: no limit).

        Speculative decoding: ``which_draft`` loads a draft model (same tokenizer) that
        proposes ``speculative_gamma`` tokens per step for the target to verify;
        ``speculative_ngram=n`` instead proposes, without a draft model, the
        ``speculative_gamma`` tokens that followed the latest earlier occurrence of the last
        n (down to 2, or 1 when n = 1) tokens (prompt lookup). Either way the output is distributed exactly
        as the target's alone (greedy: the same tokens).

        ``progress``: show loading progress (bars and notices on stderr) or not; None (default):
        ``MISTRALRS_PROGRESS=1/0``, else only when stderr is a terminal."""
        # Every argument a plugin has to provide goes through the one capability table.
        capabilities.check_runner_args(
            which_draft=which_draft, mtp_model=mtp_model, anymoe_config=anymoe_config,
            num_device_layers=num_device_layers, in_situ_quant=in_situ_quant)
        _check_paged_attn(paged_attn, no_paged_attn)
        if quant_kernel is not None and (not isinstance(quant_kernel, str) or not quant_kernel.strip()):
            raise ValueError(f"quant_kernel: must be a non-empty string, got {quant_kernel!r}")
        if max_seqs < 1:
            raise ValueError("max_seqs: must be >= 1")
        if prefix_cache_n < 0:
            raise ValueError("prefix_cache_n: must be >= 0")
        _check_limits(max_queue, request_timeout)
        if num_device_layers is not None:
            from mistralrs_core.distributed.device_map import check_num_device_layers
            check_num_device_layers(num_device_layers)
        check_progress_setting(progress)
        self._defaults = LoadOptions(
            max_seqs=max_seqs, no_kv_cache=no_kv_cache, prefix_cache_n=prefix_cache_n,
            token_source=token_source, chat_template=chat_template, jinja_explicit=jinja_explicit,
            in_situ_quant=in_situ_quant, pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage,
            pa_ctxt_len=pa_ctxt_len, pa_blk_size=pa_blk_size, pa_cache_type=pa_cache_type,
            no_paged_attn=no_paged_attn, paged_attn=paged_attn, seed=seed, device=device,
            quant_kernel=quant_kernel.strip().lower() if quant_kernel else None,
            max_queue=max_queue, request_timeout=request_timeout, progress=progress,
            num_device_layers=list(num_device_layers) if num_device_layers else None)
        self.speculative_gamma = speculative_gamma
        from mistralrs_core.loading.speculative import SpeculativeConfig
        speculation = SpeculativeConfig.from_runner_args(which_draft, speculative_gamma, speculative_ngram)
        if which_draft is not None:
            from mistralrs_core.distributed import current as current_tp
            if current_tp() is not None:
                # The draft's own forwards would run on rank 0 alone, outside the collectives.
                raise ValueError("which_draft: a draft model is not supported under tensor parallelism "
                                 "(speculative_ngram is)")
        if speculation is not None and isinstance(which, (list, tuple)) and len(which) != 1:
            raise ValueError(f"{speculation.field}: speculative decoding needs one target model, "
                             f"got {len(which)} in which")
        from mistralrs_core.anymoe.setup import AnyMoeSetup
        anymoe = AnyMoeSetup.from_runner_arg(anymoe_config)
        if anymoe is not None and isinstance(which, (list, tuple)) and len(which) != 1:
            raise ValueError(f"anymoe_config: AnyMoE applies to one model, got {len(which)} in which; "
                             f"pass it to add_model (or a serve config's [[models]] entry) instead")
        # Tool arguments go to the tool providers that claim them (refused when none does).
        self._tools = attach_tool_providers(dict(
            tool_callbacks=tool_callbacks, mcp_client_config=mcp_client_config, enable_search=enable_search,
            search_callback=search_callback, search_embedding_model=search_embedding_model,
            code_execution_config=code_execution_config, shell_config=shell_config))
        # Every chat request goes through the agent: it runs the providers' tools, keeps
        # sessions and produced files (one loop for the Runner and the server).
        self._agent = Agent(Toolbox(self._tools))
        # Prompt lookup needs no second model, so it also serves models added later.
        self._lookup = speculation if speculation is not None and speculation.ngram is not None else None
        self._models: dict[str, ModelSlot] = {}
        self._default: str | None = None
        self._lock = threading.RLock()
        try:
            for w in (which if isinstance(which, (list, tuple)) else [which]):
                self._add_model(w, None, False, speculation, {}, anymoe)
        except BaseException:
            # Tool providers may hold processes (MCP servers): a Runner that failed to
            # load must not leave them running.
            self.shutdown()
            raise

    # --- model table ------------------------------------------------------
    def add_model(self, which: Which, model_id: str | None = None, *, default: bool = False, **options: Any) -> str:
        """Load another model into this runner; ``options`` override the Runner's load options
        (and ``anymoe_config=`` makes this model an AnyMoE model)."""
        from mistralrs_core.anymoe.setup import AnyMoeSetup
        anymoe = AnyMoeSetup.from_runner_arg(options.pop("anymoe_config", None))
        return self._add_model(which, model_id, default, self._lookup, options, anymoe)

    def _add_model(self, which, model_id: str | None, default: bool, speculation, options: dict,
                   anymoe=None) -> str:
        import attrs
        opts = attrs.evolve(self._defaults, **options) if options else self._defaults
        with self._lock:
            mid = model_id or _which_model_id(which)
            base, k = mid, 2
            while model_id is None and mid in self._models:
                mid, k = f"{base}-{k}", k + 1
            if mid in self._models:
                raise ValueError(f"model_id: {mid!r} is already loaded")
            slot = ModelSlot(mid, which, opts)
            slot.speculation = speculation
            slot.anymoe = anymoe
            self._load(slot)
            self._models[mid] = slot
            if self._default is None or default:
                self._default = mid
        return mid

    def _load(self, slot: ModelSlot) -> None:
        with slot.lock:
            if slot.pipeline is not None:
                return
            prev = slot.status
            slot.status = "reloading" if prev == "unloaded" and slot.model_id in self._models else "loading"
            try:
                pipeline = load_pipeline(slot.which, slot.opts, slot.model_id)
                if slot.anymoe is not None:
                    from mistralrs_core.anymoe import attach_anymoe
                    try:
                        attach_anymoe(pipeline, slot.anymoe, slot.opts)
                    except BaseException:
                        pipeline.shutdown()
                        raise
                if slot.speculation is not None:
                    from mistralrs_core.loading.speculative import attach_speculation
                    try:
                        attach_speculation(pipeline, slot.speculation, slot.opts, slot.model_id)
                    except BaseException:
                        pipeline.shutdown()
                        raise
                slot.pipeline = pipeline
                slot.status = "loaded"
            except BaseException:
                slot.status = prev
                raise

    def _slot(self, model_id: str | None) -> ModelSlot:
        with self._lock:
            mid = model_id if model_id not in (None, "default") else self._default
            if model_id == "default" and "default" in self._models:
                mid = "default"
            slot = self._models.get(mid) if mid is not None else None
            if slot is None:
                raise ValueError(f"model_id: unknown model {model_id!r}; loaded models: {list(self._models)}")
        return slot

    def _pipeline(self, model_id: str | None):
        slot = self._slot(model_id)
        if slot.pipeline is None:
            self._load(slot)  # automatic reload of an unloaded model
        return slot.pipeline

    def list_models(self) -> list[str]:
        return list(self._models)

    def get_default_model_id(self) -> str | None:
        return self._default

    def set_default_model_id(self, model_id: str) -> None:
        with self._lock:
            if model_id not in self._models:
                raise ValueError(f"model_id: unknown model {model_id!r}; loaded models: {list(self._models)}")
            self._default = model_id

    def is_model_loaded(self, model_id: str) -> bool:
        slot = self._models.get(model_id)
        return slot is not None and slot.pipeline is not None

    def unload_model(self, model_id: str) -> None:
        slot = self._slot(model_id)
        with slot.lock:
            if slot.pipeline is not None:
                slot.pipeline.shutdown()
                slot.pipeline = None
                slot.status = "unloaded"
        gc.collect()

    def reload_model(self, model_id: str) -> None:
        self._load(self._slot(model_id))

    def list_models_with_status(self) -> list[tuple[str, str]]:
        return [(m, s.status) for m, s in self._models.items()]

    def list_unloaded_models(self) -> list[str]:
        return [m for m, s in self._models.items() if s.pipeline is None]

    def engine_stats(self, model_id: str) -> dict[str, Any] | None:
        """A loaded model's engine counters (queue, running sequences, KV blocks); None when
        the model is unloaded or has no engine. Never triggers a reload."""
        slot = self._models.get(model_id)
        engine = getattr(slot.pipeline, "engine", None) if slot is not None else None
        snapshot = getattr(engine, "snapshot", None)
        return snapshot() if snapshot is not None else None

    def model_placement(self, model_id: str) -> dict | None:
        """Where a loaded model lives (ours, beyond the SDK): its device map (layer ranges
        per device) and tensor-parallel layout; None when neither applies or it is unloaded."""
        from mistralrs_core.distributed.placement import placement_status
        slot = self._models.get(model_id)
        model = getattr(slot.pipeline, "model", None) if slot is not None else None
        return placement_status(model) if model is not None else None

    def anymoe_routes(self, prompt: str, model_id: str | None = None) -> dict[int, int]:
        """Beyond the SDK: for an AnyMoE model, the expert each AnyMoE layer picks for
        ``prompt`` (sent as one user turn, as the gate was trained), ``{layer: expert}``;
        expert 0 is the base MLP, 1.. the ``model_ids`` in order."""
        pipe = self._pipeline(model_id)
        moe = getattr(pipe, "anymoe", None)
        if moe is None:
            raise ValueError(f"model_id: {pipe.name!r} was not loaded with anymoe_config")
        return dict(zip(moe.layer_indices, moe.route(prompt)))

    def get_model_status(self, model_id: str) -> str | None:
        slot = self._models.get(model_id)
        return slot.status if slot is not None else None

    def remove_model(self, model_id: str) -> None:
        self.unload_model(model_id)
        self._agent.sessions.forget_model(model_id)
        with self._lock:
            del self._models[model_id]
            if self._default == model_id:
                self._default = next(iter(self._models), None)

    def shutdown(self) -> None:
        for mid in list(self._models):
            self.unload_model(mid)
        # What tool providers built (MCP connections, sandboxes) may hold processes.
        tools, self._tools = getattr(self, "_tools", {}), {}
        for handle in tools.values():
            close = getattr(handle, "close", None)
            if callable(close):
                close()

    def __del__(self) -> None:
        try:
            for slot in self._models.values():
                if slot.pipeline is not None:
                    slot.pipeline.shutdown()
        except Exception:
            pass

    # --- requests ---------------------------------------------------------
    def _serving(self, model_id: str | None, kinds: tuple[str, ...], call: str):
        """The model's pipeline when its kind serves ``call``, else a WrongModelKind."""
        pipe = self._pipeline(model_id)
        kind = kind_of(pipe)
        if kind not in kinds:
            raise WrongModelKind(pipe.name, kind, kinds, call)
        return pipe

    def send_chat_completion_request(self, request: ChatCompletionRequest, model_id: str | None = None) -> Any:
        """A ``ChatCompletionResponse``, or with ``request.stream`` an iterator of
        ``ChatCompletionChunkResponse``. Typed ``Any`` because which one depends on a field's
        value: a union would make every caller narrow it, which the SDK's examples never do."""
        pipe = self._serving(model_id, TEXT_KINDS, "send_chat_completion_request")
        return self._agent.chat(pipe, request, self._slot(model_id).model_id)

    def send_completion_request(self, request: CompletionRequest, model_id: str | None = None) -> CompletionResponse:
        return self._serving(model_id, TEXT_KINDS, "send_completion_request").completion(request)

    def stream_completion_request(self, request: CompletionRequest,
                                  model_id: str | None = None) -> Iterator[Any]:
        """A completion as an iterator of chunks, whatever ``request.stream`` says (the SDK
        has no streamed completion call; the server's ``/v1/completions`` needs one). The
        iterator has ``cancel()``."""
        return self._serving(model_id, TEXT_KINDS, "stream_completion_request").completion_stream(request)

    def send_chat_completion_request_to_model(self, request: ChatCompletionRequest, model_id: str) -> Any:
        return self.send_chat_completion_request(request, model_id=model_id)

    def send_completion_request_to_model(self, request: CompletionRequest, model_id: str) -> CompletionResponse:
        return self.send_completion_request(request, model_id=model_id)

    def count_chat_tokens(self, request: ChatCompletionRequest, model_id: str | None = None) -> int:
        """The prompt tokens ``send_chat_completion_request(request)`` would feed the model
        (chat template applied, image placeholders included), without generating anything.
        The server's Anthropic ``count_tokens`` route needs it."""
        from mistralrs_core.api.validate import validate_chat_request
        pipe = self._serving(model_id, TEXT_KINDS, "count_chat_tokens")
        validate_chat_request(request)
        tool_calling = getattr(pipe, "tool_calling", None)
        if tool_calling is not None:
            # Offered tools and past calls render as the model will see them (for a template
            # without tools, a system message of tool specs), so they count.
            request = tool_calling(request)[0]
        return len(pipe.chat_prompt(request).ids)

    def send_embedding_request(self, request: EmbeddingRequest, model_id: str | None = None) -> list[list[float]]:
        return self._serving(model_id, ("embedding",), "send_embedding_request").embed(request)

    def embedding_token_ids(self, request: EmbeddingRequest, model_id: str | None = None) -> list[list[int]]:
        """The token ids ``send_embedding_request`` embeds for ``request`` (for usage counts)."""
        return self._serving(model_id, ("embedding",), "embedding_token_ids").prepare(request)

    def model_kind(self, model_id: str | None = None) -> str:
        """"text", "vision", "embedding", "diffusion" or "speech" (loads an unloaded model)."""
        return kind_of(self._pipeline(model_id))

    def generate_image(self, prompt: str, response_format: ImageGenerationResponseFormat, height: int = 720,
                       width: int = 1280, model_id: str | None = None,
                       save_file: str | None = None) -> ImageGenerationResponse:
        pipe = self._serving(model_id, ("diffusion",), "generate_image")
        return pipe.generate_image(prompt, response_format, height, width, save_file)

    def generate_audio(self, prompt: str, model_id: str | None = None) -> SpeechGenerationResponse:
        return self._serving(model_id, ("speech",), "generate_audio").generate_audio(prompt)

    def send_re_isq(self, dtype: str, model_id: str | None = None) -> None:
        capabilities.check_method("send_re_isq")
        # The gate is open: the ISQ plugin's pipeline does the work.
        pipe = self._serving(model_id, TEXT_KINDS, "send_re_isq")
        re_isq = getattr(pipe, "re_isq", None)
        if re_isq is None:
            raise NotAvailableYet("send_re_isq", f"model {pipe.name!r} cannot be re-quantized")
        re_isq(dtype)

    def tokenize_text(self, text: str, add_special_tokens: bool = True, enable_thinking: bool | None = None,
                      model_id: str | None = None) -> list[int]:
        """``enable_thinking`` switches thinking in chat templates; ``text`` is raw and goes
        through no template, so the ids never depend on it (as upstream, which applies it
        only to templated messages). It is accepted for models whose template has the switch
        and refused for the others, where it could never mean anything."""
        if not isinstance(text, str):
            raise ValueError("text: must be a string")
        pipe = self._serving(model_id, TOKENIZER_KINDS, "tokenize_text")
        if enable_thinking is not None:
            if not isinstance(enable_thinking, bool):
                raise ValueError(f"enable_thinking: must be a bool or None, got {enable_thinking!r}")
            if not _has_thinking_switch(pipe):
                raise ValueError(f"enable_thinking: model {pipe.name!r} has no thinking switch in its chat "
                                 f"template; pass enable_thinking=None")
        return pipe.tokenize(text, add_special_tokens)

    def detokenize_text(self, tokens: list[int], skip_special_tokens: bool = True,
                        model_id: str | None = None) -> str:
        pipe = self._serving(model_id, TOKENIZER_KINDS, "detokenize_text")
        return pipe.detokenize(list(tokens), skip_special_tokens)

    def max_sequence_length(self, model_id: str | None = None) -> int | None:
        return getattr(self._pipeline(model_id), "max_context", None)

    def tool_providers(self) -> dict[str, Any]:
        """Tool provider name -> what it built from this Runner's tool arguments."""
        return dict(self._tools)

    # --- sessions and produced files (mistralrs_core.agent) ----------------
    def _session_model(self, model_id: str | None) -> str:
        return self._slot(model_id).model_id

    @staticmethod
    def _session_id(session_id) -> str:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id: must be a non-empty string, got {session_id!r}")
        return session_id

    def export_session(self, session_id: str, model_id: str | None = None) -> str | None:
        """The session as JSON text, or None when there is no such session."""
        return self._agent.sessions.export(self._session_model(model_id), self._session_id(session_id))

    def import_session(self, session_id: str, session_json: str, model_id: str | None = None) -> None:
        """Replace (or create) session ``session_id`` from ``export_session`` output."""
        self._agent.sessions.import_(self._session_model(model_id), self._session_id(session_id), session_json)

    def delete_session(self, session_id: str, model_id: str | None = None) -> bool:
        return self._agent.sessions.delete(self._session_model(model_id), self._session_id(session_id))

    def list_session_ids(self, model_id: str | None = None) -> list[str]:
        return self._agent.sessions.ids(self._session_model(model_id))

    def find_file(self, file_id: str) -> Any:
        """A file a tool produced (full body), or None."""
        if not isinstance(file_id, str) or not file_id:
            raise ValueError(f"file_id: must be a non-empty string, got {file_id!r}")
        return self._agent.files.find(file_id)


def _has_thinking_switch(pipe) -> bool:
    """Whether the model's chat template reads ``enable_thinking``."""
    template = getattr(pipe, "template", None)
    source = getattr(template, "source", None)
    return isinstance(source, str) and "enable_thinking" in source
