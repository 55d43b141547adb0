"""Tokenizer backends against known encodings of real tokenizer files, and the GGUF vocabulary rebuilds."""
import json
import os

import pytest

from conftest import ROOT, fixture
from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, get_tokenizer

MULTILINGUAL = "naïve café, Straße, 日本語のテキスト, emoji 🙂👍🏽 and\n\tnew lines"


def test_llama2_sentencepiece_known_encodings():
    tok = get_tokenizer(fixture("llama2-tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello world") == [15043, 3186]
    assert tok.encode("Once upon a time") == [9038, 2501, 263, 931]
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, {2}, True)
    assert tok.encode_prompt("Hello world") == [1, 15043, 3186]
    assert tok.decode(tok.encode(MULTILINGUAL)) == MULTILINGUAL


def test_mistral_sentencepiece():
    tok = get_tokenizer(fixture("mistral-tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    assert tok.decode(tok.encode(MULTILINGUAL)) == MULTILINGUAL
    # the Llama 2 / Mistral [INST] template, BOS as a token and not as text
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and tok.decode(ids) == "[INST] Hi [/INST]"


def test_llama3_tiktoken_known_encodings():
    pytest.importorskip("tiktoken")
    tok = get_tokenizer(fixture("llama3-tokenizer.model"))
    assert isinstance(tok, TiktokenTokenizer)  # told apart from sentencepiece by content, not name
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.bos_id == 128000 and tok.eos_ids == {128001, 128008, 128009}
    assert tok.decode(tok.encode(MULTILINGUAL)) == MULTILINGUAL
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}])
    assert ids[:2] == [128000, 128006] and ids[-5:] == [128009, 128006, 78191, 128007, 271]
    assert tok.encode("<|eot_id|>") == [128009]


def test_checkpoint_directory_settings_override_backend(tmp_path):
    import shutil
    shutil.copy(fixture("llama2-tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "chat_template": "X{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13]}))
    tok = get_tokenizer(str(tmp_path))
    assert tok.encode_prompt("Hello world") == [15043, 3186]
    assert tok.eos_ids == {2, 13}
    assert tok.render_chat([{"role": "user", "content": "q"}]) == "Xq"


def test_gguf_sentencepiece_vocabulary_is_rebuilt(tmp_path):
    """A llama (sentencepiece) GGUF vocabulary becomes a tokenizer.model that encodes like the original."""
    import gguf
    import sentencepiece
    from convert_checkpoint import write_gguf_tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=fixture("llama2-tokenizer.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    out = tmp_path / "out"
    out.mkdir()
    write_gguf_tokenizer(gguf.GGUFReader(str(tmp_path / "v.gguf")), "v.gguf", str(out))
    tok = get_tokenizer(str(out))
    assert tok.encode("Hello world") == [15043, 3186]
    for text in ("Once upon a time", MULTILINGUAL, "  spaces  and 12345 digits"):
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_prompt("Hello world") == [1, 15043, 3186]


def test_default_model_tokenizer_matches_llama_cpp(default_checkpoint):
    """Token ids recorded from llama.cpp's own tokenizer on the default model's GGUF."""
    with open(os.path.join(ROOT, "tests", "data", "smollm2_llamacpp_tokens.json"), encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    tok = get_tokenizer(default_checkpoint)
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    assert tok.decode(tok.encode(MULTILINGUAL)) == MULTILINGUAL
    assert tok.eos_ids == {0, 2} and not tok.add_bos
    chat = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_missing_tokenizer_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        get_tokenizer(str(tmp_path))
