"""BagelTokenizer against the official golden ids, and the tiny tokenizer writer."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from bagel_ray.model.tiny_tokenizer import write_tiny_tokenizer
from bagel_ray.model.tokenizer import BagelTokenizer, clean_generated_text

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


# --- golden checkpoint ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_tokenizer(golden_model_dir: Path) -> BagelTokenizer:
    return BagelTokenizer.from_folder(golden_model_dir)


def test_golden_special_ids(golden_tokenizer: BagelTokenizer, manifest: dict) -> None:
    info = manifest["model"]["tokenizer"]
    expected = info["bagel_new_token_ids"]
    assert golden_tokenizer.bos_id == expected["bos_token_id"]
    assert golden_tokenizer.eos_id == expected["eos_token_id"]
    assert golden_tokenizer.start_of_image == expected["start_of_image"]
    assert golden_tokenizer.end_of_image == expected["end_of_image"]
    assert golden_tokenizer.new_token_ids == expected
    assert golden_tokenizer.vocab_len == info["total_tokens"]


def test_golden_text_segments(golden_tokenizer: BagelTokenizer, manifest: dict) -> None:
    checked = 0
    for name, case in manifest["cases"].items():
        for segment in case["results"]["text_segments"]:
            assert golden_tokenizer.text_segment(segment["text"]) == segment["ids"], (name, segment["index"])
            checked += 1
    assert checked > 0


def test_golden_encode_without_specials(golden_tokenizer: BagelTokenizer) -> None:
    expected = [801, 353, 68, 256, 987, 983, 83, 540, 259, 734, 13]
    assert golden_tokenizer.encode("Tell me a fun fact about the moon.") == expected


def test_golden_decode_generated(golden_tokenizer: BagelTokenizer, manifest: dict) -> None:
    cases = {name: c for name, c in manifest["cases"].items() if "decoded_generated_ids" in c["results"]}
    assert {"text2text", "img2text"} <= set(cases)
    for name, case in cases.items():
        results = case["results"]
        assert golden_tokenizer.decode(results["generated_ids"]) == results["decoded_generated_ids"], name
        # The official output: decode of the emitted list (which starts with <|im_start|>), then cleaned.
        emitted = [golden_tokenizer.bos_id, *results["generated_ids"]]
        assert clean_generated_text(golden_tokenizer.decode(emitted)) == results["output_text"], name


def test_golden_think_retokenized(golden_tokenizer: BagelTokenizer, manifest: dict) -> None:
    results = manifest["cases"]["text2img_think"]["results"]
    emitted = [golden_tokenizer.bos_id, *results["think_generated_ids"]]
    assert clean_generated_text(golden_tokenizer.decode(emitted)) == results["think_text"]
    assert golden_tokenizer.text_segment(results["think_text"]) == results["think_retokenized_ids"]


def test_golden_decode_keeps_special_tokens(golden_tokenizer: BagelTokenizer) -> None:
    tok = golden_tokenizer
    ids = [tok.bos_id, *tok.encode("the moon"), tok.eos_id, tok.start_of_image, tok.end_of_image]
    assert tok.decode(ids) == "<|im_start|>the moon<|im_end|><|vision_start|><|vision_end|>"


def test_decode_rejects_ids_outside_vocabulary(golden_tokenizer: BagelTokenizer) -> None:
    with pytest.raises(ValueError, match="outside"):
        golden_tokenizer.decode([1, golden_tokenizer.vocab_len])


def test_tiny_writer_mirrors_golden_layout(tmp_path: Path, golden_model_dir: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    ours = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    golden = json.loads((golden_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == golden[key], key
    assert {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")} == {
        k: v for k, v in golden["model"].items() if k not in ("vocab", "merges")
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == json.loads((golden_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))


# --- clean_generated_text ------------------------------------------------------------------


def test_clean_generated_text_follows_official_split() -> None:
    assert clean_generated_text("<|im_start|>hello<|im_end|>rest") == "hello"
    assert clean_generated_text("<|im_start|> no end") == " no end"
    # `.split('<|im_start|>')[1]`: a second <|im_start|> also ends the text.
    assert clean_generated_text("<|im_start|>a<|im_start|>b<|im_end|>") == "a"
    with pytest.raises(ValueError):
        clean_generated_text("no start<|im_end|><|im_start|>x")


# --- tiny tokenizer writer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


def test_tiny_special_ids(tiny_dir: Path) -> None:
    tok = BagelTokenizer.from_folder(tiny_dir)
    # Qwen2.5 order right after the 1000 BPE entries, as in the golden checkpoint.
    assert (tok.bos_id, tok.eos_id, tok.start_of_image, tok.end_of_image) == (1001, 1002, 1009, 1010)
    assert tok.vocab_len == 1022


def test_tiny_round_trip_unicode(tiny_dir: Path) -> None:
    tok = BagelTokenizer.from_folder(tiny_dir)
    text = "Grüße aus Zürich! 東京の月 🌕🦊 naïve café\t—\n  «ÆØÅ» ∑x² \x00\x7f end"
    ids = tok.encode(text)
    assert max(ids) < 1000  # plain text never produces added tokens
    assert tok.decode(ids) == text
    segment = tok.text_segment(text)
    assert segment[0] == tok.bos_id and segment[-1] == tok.eos_id
    assert clean_generated_text(tok.decode(segment)) == text


def test_tiny_nfc_and_special_strings(tiny_dir: Path) -> None:
    tok = BagelTokenizer.from_folder(tiny_dir)
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")
    ids = tok.encode("a<|vision_start|>b")
    assert tok.start_of_image in ids
    assert tok.decode(ids) == "a<|vision_start|>b"


def test_tiny_files_are_consistent(tiny_dir: Path) -> None:
    """vocab.json and merges.txt (read by the slow Qwen2Tokenizer) carry tokenizer.json's BPE."""
    model = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == model["vocab"] and len(vocab) == 1000
    lines = (tiny_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert [line.split(" ") for line in lines[1:]] == [list(m) for m in model["merges"]]


def test_tiny_writer_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_tiny_writer_vocab_size(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path, vocab_size=300)
    tok = BagelTokenizer.from_folder(tmp_path)
    assert (tok.bos_id, tok.vocab_len) == (301, 322)
    assert tok.decode(tok.encode("A red fox, 2 owls.")) == "A red fox, 2 owls."
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_tokenizer(tmp_path / "small", vocab_size=255)


def test_missing_vision_start_raises(tmp_path: Path, tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for entry in raw["added_tokens"]:
        if entry["content"] == "<|vision_start|>":
            entry["content"] = "<|vision_begin|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ValueError, match="vision_start"):
        BagelTokenizer.from_folder(tmp_path)


def test_missing_tokenizer_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BagelTokenizer.from_folder(tmp_path)


def test_max_token_bytes_bounds_every_tokens_text(tiny_dir: Path, golden_tokenizer: BagelTokenizer) -> None:
    """No token stands for more bytes than `max_token_bytes`, and some token stands for that
    many: a text of n bytes is at least n / max_token_bytes tokens, with no slack."""
    for tok in (BagelTokenizer.from_folder(tiny_dir), golden_tokenizer):
        longest = tok.max_token_bytes
        texts = (tok.decode([i]) for i in range(tok.vocab_len))
        lengths = [len(text.encode("utf-8")) for text in texts if "\ufffd" not in text]  # whole characters only
        assert max(lengths) == longest
        for text in ("<|object_ref_start|>" * 50, "the quick brown fox " * 200, "日本語のテキスト" * 100, " " * 3000):
            assert len(tok.encode(text)) * longest >= len(unicodedata.normalize("NFC", text).encode("utf-8"))
