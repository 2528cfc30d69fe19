"""Constrained decoding: grammars compiled by llguidance, one matcher per sequence.

A request is constrained when its ``grammar_type`` and ``grammar`` are set (the SDK's
``CompletionRequest`` / ``ChatCompletionRequest`` fields; over HTTP also
``response_format`` and mistral.rs's ``grammar: {"type", "value"}``). Accepted
``grammar_type`` spellings, exactly as the SDK writes them:

- ``"regex"``: a regular expression the whole output must match (Rust ``regex`` syntax);
- ``"json_schema"``: a JSON Schema (text or dict) the output must be an instance of;
- ``"lark"``: a Lark grammar in llguidance's dialect (``start: ...``), which may embed
  JSON schemas with ``%json { ... }`` (what tool calling uses for a call's arguments);
- ``"llguidance"``: llguidance's own JSON form, ``{"grammars": [...]}``.

Anything else is refused by request validation (``grammar_type: must be one of ...``);
a grammar that does not compile is a ``ValueError("grammar: <compiler message>")``
raised when the request is submitted, before it reaches the engine.

Other code builds constrained requests through the same two fields (tool calling sets
``grammar_type="lark"`` or ``"json_schema"``); nothing else is needed. To check a schema or
grammar without submitting anything, ``TextPipeline.grammar_compiler.compile(type, text)``
raises the same ``ValueError``.

JSON schemas (``json_schema``) compile to one-line JSON spaced like ``json.dumps``
(``compile.JSON_DEFAULTS``): llguidance's default allows any whitespace between tokens, and
small models then fill their budget with newlines. A schema embedded in lark with ``%json``
keeps llguidance's defaults unless it says otherwise; add
``"x-guidance": {"whitespace_flexible": false}`` to it for compact JSON.

Semantics: end tokens are allowed only where the grammar may end; once the grammar can take
nothing more the sequence finishes with ``finish_reason="stop"``. ``response_format``'s
``strict`` does not change anything: the output is always constrained.

Modules: ``vocab`` (llguidance's view of a model tokenizer, HF or GGUF-built),
``compile`` (grammar text -> ``CompiledGrammar``), ``state`` (``SequenceGrammar``: a
sequence's matcher and token mask; it is the sequence's last logits processor), and
``prefetch`` (``MaskPrefetcher``: computes next-step masks on a worker thread while the
model runs).
"""
from mistralrs_core.constrained.compile import CompiledGrammar, GrammarCompiler
from mistralrs_core.constrained.prefetch import MaskPrefetcher
from mistralrs_core.constrained.state import SequenceGrammar
from mistralrs_core.constrained.vocab import grammar_tokenizer

__all__ = ["CompiledGrammar", "GrammarCompiler", "MaskPrefetcher", "SequenceGrammar", "grammar_tokenizer"]
