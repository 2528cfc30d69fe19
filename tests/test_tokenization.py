"""Tokenizer wrapper, streaming detokenizer and chat templates, on tiny tokenizers
trained here (no hub access)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from mistralrs_core.tokenization import (
    ChatTemplate,
    IncrementalDetokenizer,
    Tokenizer,
    apply_chat_template,
    encode_prompt,
    generation_eos_ids,
    resolve_chat_template,
)
from mistralrs_core.tokenization.token_bytes import unicode_to_byte

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; pieces become ids.",
    "你好，世界。今天天气很好。",
    "Emoji are fun 🎉 and rockets 🚀 fly high.",
    "naïve café résumé — déjà vu",
    "def add(a, b):\n    return a + b\n",
    "    indented   with   many spaces   ",
] * 3

# Characters absent from CORPUS force byte pieces / byte fallback.
SAMPLES = [
    "Hello world!",
    "  two  leading spaces and trailing  ",
    "你好，世界 and 日本語のテキスト",
    "Party 🎉🚀 time 👩‍👩‍👧 family 🇫🇷 flag",
    "naïve café — ünïcödé ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "line one\nline two\n\n\tTabbed",
    "ß∂ƒ©˙∆˚¬…æ≈ç√∫˜µ≤≥÷",
    "",
]

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if tools is defined and tools is not none %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nTools:\\n' }}\n"
    "{%- for t in tools %}{{ t | tojson(indent=2) }}{{ '\\n' }}{% endfor %}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML_TEMPLATE = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n# Tools\\n<tools>' }}\n"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "{{- '\\n</tools><|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Unknown role: ' + message.role) }}\n"
    "{%- endif %}\n"
    "{%- if loop.index0 > 50 %}{% break %}{% endif %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' }}\n"
    "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}\n"
    "{{- message.content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}\n"
    "{{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "{%- endif %}\n"
    "{%- endif %}\n"
)

MESSAGES = [
    {"role": "system", "content": "You are terse. Ünïcödé ok 🎉"},
    {"role": "user", "content": "  Hi there  "},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
    {"role": "user", "content": "你好?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Wetter für <city> & co",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


# ---------------------------------------------------------------------------- builders


def build_byte_level(specials: list[str], bos: str | None) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def build_llama2_like() -> HFTokenizer:
    """SentencePiece-BPE as Llama 2's tokenizer.json spells it: ▁ for spaces, <0xAB> byte
    fallback, a Strip decoder removing the prepended space."""
    specials = ["<unk>", "<s>", "</s>"]
    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, limit_alphabet=60, show_progress=False)
    base.train_from_iterator(CORPUS, trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials + ["<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def build_metaspace_unigram() -> HFTokenizer:
    """Unigram with a Metaspace pre-tokenizer/decoder and byte fallback (T5/Gemma-like)."""
    specials = ["<unk>", "<bos>", "<eos>"]
    base = HFTokenizer(models.Unigram())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=250, special_tokens=specials, unk_token="<unk>", show_progress=False)
    base.train_from_iterator(CORPUS, trainer)
    pieces = [tuple(p) for p in json.loads(base.to_str())["model"]["vocab"]]
    have = {p for p, _ in pieces}
    pieces += [(f"<0x{b:02X}>", -50.0) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok = HFTokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens(specials + ["<start_of_turn>", "<end_of_turn>"])
    return tok


def write_model_dir(path: Path, tok: HFTokenizer, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.fixture(scope="module")
def llama3_dir(tmp_module):
    tok = build_byte_level(LLAMA3_SPECIALS, "<|begin_of_text|>")
    return write_model_dir(
        tmp_module / "llama3",
        tok,
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": {"content": "<|eot_id|>", "lstrip": False, "special": True, "__type": "AddedToken"},
            "chat_template": LLAMA3_TEMPLATE,
        },
    )


@pytest.fixture(scope="module")
def chatml_dir(tmp_module):
    tok = build_byte_level(CHATML_SPECIALS, None)
    return write_model_dir(
        tmp_module / "chatml",
        tok,
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": [
                {"name": "default", "template": CHATML_TEMPLATE},
                {"name": "tool_use", "template": "{{ 'tools!' }}"},
            ],
        },
    )


@pytest.fixture(scope="module")
def llama2_dir(tmp_module):
    return write_model_dir(
        tmp_module / "llama2",
        build_llama2_like(),
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": {"content": "<unk>", "special": True, "__type": "AddedToken"},
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": CHATML_TEMPLATE,
        },
    )


@pytest.fixture(scope="module")
def unigram_dir(tmp_module):
    return write_model_dir(
        tmp_module / "unigram",
        build_metaspace_unigram(),
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True},
    )


@pytest.fixture(scope="module")
def all_tokenizers(llama3_dir, chatml_dir, llama2_dir, unigram_dir):
    return {name: Tokenizer.from_dir(d) for name, d in
            [("llama3", llama3_dir), ("chatml", chatml_dir), ("llama2", llama2_dir), ("unigram", unigram_dir)]}


# ------------------------------------------------------------------------ tokenizer


def test_special_tokens_from_config(all_tokenizers):
    t = all_tokenizers["llama3"]
    assert t.bos_token == "<|begin_of_text|>"
    assert t.eos_token == "<|eot_id|>"
    assert t.bos_token_id == t.token_to_id("<|begin_of_text|>")
    assert t.eos_token_ids == {t.token_to_id("<|eot_id|>")}
    assert t.token_to_id("<|eot_id|>") in t.special_ids
    assert t.vocab_size == t.inner.get_vocab_size(with_added_tokens=True)
    assert t.chat_template == LLAMA3_TEMPLATE

    c = all_tokenizers["chatml"]
    assert c.bos_token is None and c.bos_token_id is None
    assert c.pad_token_id == c.token_to_id("<|endoftext|>")
    assert c.chat_template == CHATML_TEMPLATE  # the "default" entry of the list form
    assert set(c.chat_templates) == {"default", "tool_use"}

    u = all_tokenizers["llama2"]
    assert u.unk_token == "<unk>" and u.unk_token_id == 0


def test_special_token_forms(tmp_path):
    raw = build_byte_level(CHATML_SPECIALS, None)
    write_model_dir(tmp_path, raw, {"eos_token": {"content": "<|im_end|>"}, "bos_token": None})
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    t = Tokenizer.from_dir(tmp_path)
    assert t.eos_token == "<|im_end|>" and t.bos_token is None and t.pad_token == "<|endoftext|>"
    assert t.chat_template is None


def test_add_eos_ids_extends_set(chatml_dir):
    t = Tokenizer.from_dir(chatml_dir)
    end = t.token_to_id("<|endoftext|>")
    t.add_eos_ids([end])
    assert t.eos_token_ids == {t.token_to_id("<|im_end|>"), end}


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2", "unigram"])
def test_encode_decode_roundtrip(all_tokenizers, name):
    t = all_tokenizers[name]
    for text in SAMPLES:
        ids = t.encode(text, add_special_tokens=False)
        decoded = t.decode(ids)
        if name == "unigram" and text.startswith(" "):
            # Metaspace's decoder drops one leading space, the one it assumes it prepended.
            assert decoded == text[1:]
        else:
            assert decoded == text, (name, text, decoded)
        assert "\ufffd" not in decoded
    assert t.encode_batch(SAMPLES[:3], add_special_tokens=False) == [t.encode(s, False) for s in SAMPLES[:3]]


def test_bos_added_once(all_tokenizers):
    for name in ("llama3", "llama2", "unigram"):
        t = all_tokenizers[name]
        ids = t.encode("Hello world", add_special_tokens=True)
        assert ids[0] == t.bos_token_id and ids[1] != t.bos_token_id, name
        assert t.adds_bos
        assert t.encode("Hello world", add_special_tokens=False)[0] != t.bos_token_id
    c = all_tokenizers["chatml"]
    assert not c.adds_bos
    assert c.encode("Hello", True) == c.encode("Hello", False)


def test_from_tokenizers_add_bos_without_post_processor():
    raw = build_byte_level(LLAMA3_SPECIALS, None)
    t = Tokenizer.from_tokenizers(raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", add_bos=True,
                                  extra_eos_ids=[raw.token_to_id("<|eot_id|>")], chat_template="{{ 'x' }}")
    bos = raw.token_to_id("<|begin_of_text|>")
    assert t.encode("hi")[:1] == [bos] and t.encode("hi")[1] != bos
    assert t.eos_token_ids == {raw.token_to_id("<|end_of_text|>"), raw.token_to_id("<|eot_id|>")}
    assert t.chat_template == "{{ 'x' }}"


def test_skip_special_tokens(all_tokenizers):
    t = all_tokenizers["llama3"]
    ids = t.encode("<|start_header_id|>user<|end_header_id|>Hi<|eot_id|>", add_special_tokens=True)
    assert t.decode(ids) == "userHi"
    assert t.decode(ids, skip_special_tokens=False) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>Hi<|eot_id|>"


def test_token_bytes_byte_level(all_tokenizers):
    t = all_tokenizers["llama3"]
    table = unicode_to_byte()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41
    for text in SAMPLES:
        ids = t.encode(text, add_special_tokens=False)
        assert b"".join(t.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert t.token_bytes(t.token_to_id("<|eot_id|>")) == b"<|eot_id|>"
    assert t.token_bytes(10**7) == b""


def test_token_bytes_sentencepiece(all_tokenizers):
    t = all_tokenizers["llama2"]
    assert t.token_bytes(t.token_to_id("<0xE4>")) == b"\xe4"
    for text in SAMPLES[:-1]:
        ids = t.encode(text, add_special_tokens=False)
        # The normalizer prepends "▁", which shows up as one leading space byte.
        assert b"".join(t.token_bytes(i) for i in ids) == b" " + text.encode("utf-8")
    u = all_tokenizers["unigram"]
    for text in SAMPLES[:-1]:
        ids = u.encode(text, add_special_tokens=False)
        joined = b"".join(u.token_bytes(i) for i in ids)
        assert joined.decode("utf-8").strip() == text.strip()


def test_missing_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="SentencePiece"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_json"):
        Tokenizer.from_dir(tmp_path, tokenizer_json=str(tmp_path / "nope.json"))
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_json_override(tmp_path, llama3_dir):
    other = tmp_path / "elsewhere.json"
    other.write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    t = Tokenizer.from_dir(tmp_path, tokenizer_json=str(other))
    assert t.decode(t.encode("Hello", False)) == "Hello"
    assert t.bos_token is None  # no tokenizer_config.json next to the model


def test_truncation_and_padding_disabled(tmp_path):
    raw = build_byte_level(CHATML_SPECIALS, None)
    raw.enable_truncation(4)
    raw.enable_padding(length=64)
    t = Tokenizer.from_tokenizers(raw)
    assert len(t.encode("Hello world! The quick brown fox jumps")) > 4
    assert len(t.encode("Hi")) < 64


# --------------------------------------------------------------------- detokenizer


def stream(t, ids, **kw):
    d = IncrementalDetokenizer(t, **kw)
    deltas = [d.push(i) for i in ids]
    tail = d.flush()
    return deltas, tail, d


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2", "unigram"])
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_matches_full_decode(all_tokenizers, name, skip):
    t = all_tokenizers[name]
    for text in SAMPLES:
        for add_special in (False, True):
            ids = t.encode(text, add_special_tokens=add_special)
            if t.eos_token_id is not None:
                ids = ids + [t.eos_token_id]
            deltas, tail, d = stream(t, ids, skip_special_tokens=skip)
            full = t.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) + tail == full, (name, text)
            assert d.text == full
            assert all("\ufffd" not in x for x in deltas), (name, text, deltas)
            assert tail == ""  # valid text leaves nothing held back


@pytest.mark.parametrize("name", ["llama3", "llama2", "unigram"])
def test_incremental_specials_in_the_middle(all_tokenizers, name):
    t = all_tokenizers[name]
    specials = sorted(t.special_ids)
    parts = [t.encode(s, add_special_tokens=False) for s in ("Hello 你好", " world 🎉", "naïve")]
    ids = parts[0] + [specials[-1]] + parts[1] + [specials[0]] + parts[2]
    for skip in (True, False):
        deltas, tail, _ = stream(t, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == t.decode(ids, skip_special_tokens=skip)


def test_incremental_emits_progressively(all_tokenizers):
    t = all_tokenizers["llama2"]
    ids = t.encode("Hello world, 你好 🎉 and more words here", add_special_tokens=False)
    deltas, _, _ = stream(t, ids)
    assert sum(1 for x in deltas if x) >= 5  # streamed, not held until the end
    # The first piece keeps no phantom leading space and later words keep theirs.
    assert deltas[0] and not deltas[0].startswith(" ")
    assert any(x.startswith(" ") for x in deltas[1:])


def test_incremental_holds_split_utf8(all_tokenizers):
    t = all_tokenizers["llama3"]
    ids = t.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji was never seen in training, so it is split into bytes
    d = IncrementalDetokenizer(t)
    outs = [d.push(i) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "🦀"


def test_incremental_flush_returns_dangling_bytes(all_tokenizers):
    t = all_tokenizers["llama3"]
    ids = t.encode("ok 🦀", add_special_tokens=False)[:-1]  # cut the emoji short
    deltas, tail, d = stream(t, ids)
    assert "".join(deltas).startswith("ok") and all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) + tail == t.decode(ids) and "\ufffd" in tail


@pytest.mark.parametrize("name", ["llama3", "llama2", "unigram"])
def test_incremental_random_ids(all_tokenizers, name):
    t = all_tokenizers[name]
    rng = random.Random(1234)
    # Random byte-fallback runs are mostly invalid UTF-8, and how a decoder replaces an
    # invalid run depends on where the run starts, so those pieces only have to not crash.
    is_byte_piece = lambda i: (t.id_to_token(i) or "").startswith("<0x")  # noqa: E731
    pool = [i for i in range(t.vocab_size) if not is_byte_piece(i)]
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 30))]
        garbage = [rng.randrange(t.vocab_size) for _ in range(20)]
        for skip in (True, False):
            deltas, tail, _ = stream(t, ids, skip_special_tokens=skip)
            assert "".join(deltas) + tail == t.decode(ids, skip_special_tokens=skip)
            deltas, tail, _ = stream(t, garbage, skip_special_tokens=skip)
            if name == "llama3":
                assert "".join(deltas) + tail == t.decode(garbage, skip_special_tokens=skip)


def test_incremental_with_prompt_context(all_tokenizers):
    t = all_tokenizers["llama2"]
    prompt = t.encode("Say hello", add_special_tokens=True)
    gen = t.encode("world 你好 🎉", add_special_tokens=False)
    d = IncrementalDetokenizer(t, prompt_ids=prompt)
    out = "".join(d.push(i) for i in gen) + d.flush()
    expected = t.decode(prompt + gen)[len(t.decode(prompt)):]
    assert out == expected and out.startswith(" world")
    # Without the context the first token's leading space is dropped, as a plain decode does.
    deltas, tail, _ = stream(t, gen)
    assert "".join(deltas) + tail == t.decode(gen) == "world 你好 🎉"


# ------------------------------------------------------------------- chat templates


def test_render_llama3(all_tokenizers):
    t = all_tokenizers["llama3"]
    tmpl = ChatTemplate(LLAMA3_TEMPLATE)
    out = tmpl.render(MESSAGES[:2], bos_token=t.bos_token, eos_token=t.eos_token)
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse. Ünïcödé ok 🎉<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    no_gen = tmpl.render(MESSAGES[:2], add_generation_prompt=False, bos_token="<B>")
    assert no_gen.startswith("<B>") and no_gen.endswith("Hi there<|eot_id|>")


def test_render_chatml_thinking_and_tools():
    tmpl = ChatTemplate(CHATML_TEMPLATE)
    plain = tmpl.render(MESSAGES)
    assert plain.endswith("<|im_start|>assistant\n")
    assert "<think>\ngreet back\n</think>" in plain
    assert tmpl.render(MESSAGES, enable_thinking=True) == plain
    assert tmpl.render(MESSAGES, enable_thinking=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with_tools = tmpl.render(MESSAGES, tools=TOOLS)
    assert '"description": "Wetter für <city> & co"' in with_tools  # not HTML-escaped, not \u-escaped
    # "reasoning" is accepted as an alias of reasoning_content
    aliased = tmpl.render([{"role": "assistant", "content": "x", "reasoning": "why"}])
    assert "<think>\nwhy\n</think>" in aliased


def test_tojson_indent():
    out = ChatTemplate("{{ x | tojson(indent=2) }}|{{ y | tojson }}").render([], x={"a": [1]}, y="ü<")
    assert out == '{\n  "a": [\n    1\n  ]\n}|"ü<"'


def test_raise_exception_and_errors():
    tmpl = ChatTemplate(CHATML_TEMPLATE, origin="mine")
    with pytest.raises(ValueError, match="Unknown role: wizard"):
        tmpl.render([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="syntax error.*line 1"):
        ChatTemplate("{% for m in messages %}{{ m }", origin="broken.jinja")
    with pytest.raises(ValueError, match="broken.jinja"):
        ChatTemplate("{% if %}", origin="broken.jinja")
    with pytest.raises(ValueError, match="mine"):
        tmpl.render([{"role": "user"}])  # content missing: undefined + str


def test_sandbox_blocks_escapes():
    for src in (
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace(__x=1) %}{{ ns }}",
        "{{ messages.append(1) }}",
    ):
        with pytest.raises(ValueError):
            ChatTemplate(src).render([{"role": "user", "content": "x"}])


def test_strftime_and_loopcontrols():
    out = ChatTemplate("{{ strftime_now('%Y') }}{% for i in [1,2,3] %}{% if i == 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}").render([])
    assert out[:4].isdigit() and out[4:] == "13"
    gen = ChatTemplate("{% generation %}A{% endgeneration %}B").render([])
    assert gen == "AB"


def test_enable_thinking_undefined_when_none():
    tmpl = ChatTemplate("{{ 'def' if enable_thinking is defined else 'undef' }}")
    assert tmpl.render([]) == "undef"
    assert tmpl.render([], enable_thinking=False) == "def"


def test_resolve_priority(tmp_path, chatml_dir):
    tok = Tokenizer.from_dir(chatml_dir)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    # nothing given: the tokenizer's template
    assert resolve_chat_template(model_dir, tok).source == CHATML_TEMPLATE
    # chat_template.jinja in the model dir beats tokenizer_config
    (model_dir / "chat_template.jinja").write_text("JINJA{{ 1 }}", encoding="utf-8")
    assert resolve_chat_template(model_dir, tok).source == "JINJA{{ 1 }}"
    # chat_template argument: json file, jinja file, literal
    jf = tmp_path / "tmpl.json"
    jf.write_text(json.dumps({"chat_template": "JSON{{ 2 }}"}), encoding="utf-8")
    assert resolve_chat_template(model_dir, tok, chat_template=str(jf)).source == "JSON{{ 2 }}"
    jinja = tmp_path / "t.jinja"
    jinja.write_text("FILE{{ 3 }}", encoding="utf-8")
    assert resolve_chat_template(model_dir, tok, chat_template=str(jinja)).source == "FILE{{ 3 }}"
    assert resolve_chat_template(model_dir, tok, chat_template="LIT{{ 4 }}").source == "LIT{{ 4 }}"
    # jinja_explicit beats everything
    got = resolve_chat_template(model_dir, tok, chat_template=str(jf), jinja_explicit=str(jinja))
    assert got.source == "FILE{{ 3 }}"
    assert resolve_chat_template(model_dir, tok, jinja_explicit="EXP{{ 5 }}").render([]) == "EXP5"
    # none at all
    bare = Tokenizer.from_tokenizers(tok.inner)
    assert resolve_chat_template(tmp_path / "missing", bare) is None
    assert resolve_chat_template(None, None) is None


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_chat_template(None, None, chat_template=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"other": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        resolve_chat_template(None, None, chat_template=str(bad))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for %}", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jinja"):
        resolve_chat_template(None, None, jinja_explicit=str(broken))
    with pytest.raises(ValueError, match="literal"):
        resolve_chat_template(None, None, chat_template="{{ oops")


def test_apply_chat_template_single_bos(all_tokenizers):
    # template writes BOS itself and the tokenizer also adds it: exactly one BOS
    t = all_tokenizers["llama3"]
    ids = apply_chat_template(ChatTemplate(LLAMA3_TEMPLATE), t, MESSAGES[:2])
    assert ids[0] == t.bos_token_id and ids[1] != t.bos_token_id
    assert ids.count(t.bos_token_id) == 1
    # template without BOS on a tokenizer that adds one: BOS is prepended
    l2 = all_tokenizers["llama2"]
    ids = apply_chat_template(ChatTemplate(CHATML_TEMPLATE), l2, MESSAGES[:2])
    assert ids[0] == l2.bos_token_id and ids.count(l2.bos_token_id) == 1
    assert ids[-1] != l2.eos_token_id
    # tokenizer without BOS: nothing added
    c = all_tokenizers["chatml"]
    ids = apply_chat_template(ChatTemplate(CHATML_TEMPLATE), c, MESSAGES[:2], enable_thinking=False)
    assert ids[0] == c.token_to_id("<|im_start|>")
    assert c.decode(ids, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")
    assert encode_prompt(c, "") == []
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(None, c, MESSAGES)


def test_generation_eos_ids(all_tokenizers):
    t = all_tokenizers["llama3"]
    end = t.token_to_id("<|end_of_text|>")
    ids = generation_eos_ids(t, ChatTemplate(LLAMA3_TEMPLATE), {"eos_token_id": [end, 10**9]}, {"eos_token_id": end})
    assert ids == {t.token_to_id("<|eot_id|>"), end}
    c = all_tokenizers["chatml"]
    assert generation_eos_ids(c, ChatTemplate(CHATML_TEMPLATE)) == {c.token_to_id("<|im_end|>")}
    # A multimodal config keeps the text model's ids in text_config.
    assert generation_eos_ids(t, None, None, {"text_config": {"eos_token_id": end}}) >= {end}
    assert end not in generation_eos_ids(t, None, None, {})


# ------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("which", ["llama3", "chatml", "llama2"])
def test_matches_transformers(which, llama3_dir, chatml_dir, llama2_dir):
    transformers = pytest.importorskip("transformers")
    directory = {"llama3": llama3_dir, "chatml": chatml_dir, "llama2": llama2_dir}[which]
    template = LLAMA3_TEMPLATE if which == "llama3" else CHATML_TEMPLATE
    ours = Tokenizer.from_dir(directory)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token=ours.bos_token,
        eos_token=ours.eos_token,
        unk_token=ours.unk_token,
    )
    cases = [
        dict(messages=MESSAGES, add_generation_prompt=True),
        dict(messages=MESSAGES[:2], add_generation_prompt=False),
        dict(messages=MESSAGES, add_generation_prompt=True, tools=TOOLS),
        dict(messages=MESSAGES, add_generation_prompt=True, enable_thinking=False),
    ]
    tmpl = ChatTemplate(template)
    for case in cases:
        case = dict(case)
        messages = case.pop("messages")
        expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, **case)
        got = tmpl.render(
            messages, bos_token=ours.bos_token, eos_token=ours.eos_token, unk_token=ours.unk_token, **case
        )
        assert got == expected, case

    # Plain encoding agrees with AutoTokenizer reading the same directory.
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in SAMPLES:
        assert ours.encode(text) == auto.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == auto.encode(text, add_special_tokens=False)
        ids = auto.encode(text)
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["llama3", "chatml", "llama2", "unigram"])
def test_incremental_with_chat_prompt_context(all_tokenizers, name):
    t = all_tokenizers[name]
    prompt = apply_chat_template(ChatTemplate(CHATML_TEMPLATE), t, MESSAGES)
    for text in SAMPLES:
        gen = t.encode(text, add_special_tokens=False)
        d = IncrementalDetokenizer(t, True, prompt)
        deltas = [d.push(i) for i in gen]
        out = "".join(deltas) + d.flush()
        kept = [i for i in prompt if i not in t.special_ids]
        expected = t.decode(kept[-5:] + gen)[len(t.decode(kept[-5:])):]
        assert out == expected == d.text, (name, text)
        assert all("\ufffd" not in x for x in deltas)
