"""Write a small Qwen2-style byte-level BPE tokenizer for tiny test checkpoints.

Tests and tiny checkpoints need a tokenizer that behaves like the real Qwen2.5 one (byte-level
BPE, the same pre-tokenizer regex, NFC, BAGEL's special tokens as added tokens right after the
BPE vocabulary) without shipping 150k entries. `write_tiny_tokenizer` trains one on a short
embedded English text and writes the four files of the official layout (`tokenizer.json`,
`vocab.json`, `merges.txt`, `tokenizer_config.json`), so both our loader (`tokenizer.json`
through `tokenizers`) and the official `Qwen2Tokenizer` (`vocab.json` + `merges.txt`) can read it.

The output is deterministic: the corpus is fixed, the BPE trainer breaks ties by pair ids over
an alphabet sorted by code point, and every file is serialised with a fixed key order. The
initial alphabet is the full 256-symbol byte-level alphabet, so any UTF-8 text round-trips.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from tokenizers.trainers import BpeTrainer

# The Qwen2.5 added tokens, in their id order. The first 14 are `special: true` in the real
# tokenizer; the tool-call and fill-in-the-middle ones are plain added tokens (`special: false`).
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# `additional_special_tokens` of the real Qwen2.5 `tokenizer_config.json`.
QWEN2_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = tuple(t for t, _ in QWEN2_ADDED_TOKENS[1:14])

# Qwen2's pre-tokenizer split pattern (from its `tokenizer.json`).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The pipeline around the BPE model, field for field as in Qwen2's `tokenizer.json`. Training
# replaces the (empty) model; everything else is kept.
_PIPELINE: dict = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": {"type": "NFC"},
    "pre_tokenizer": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    },
    "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {},
        "merges": [],
    },
}

# A minimal chat template; BAGEL never applies one (spec 7.1), it is here so that the config
# reads like a real Qwen2 one.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text: plain English on the themes of the test prompts, with some digits and
# punctuation. It supports BPE vocabularies up to `MAX_TINY_VOCAB_SIZE` entries.
_CORPUS: tuple[str, ...] = (
    "The moon is the only natural satellite of the Earth. It is about a quarter of the Earth's width, "
    "and it always shows the same face to us, because it turns once on its axis in the time it takes "
    "to go once around the planet. A fun fact about the moon: footprints left by the astronauts in 1969 "
    "will probably stay there for millions of years, since there is no wind and no rain to wash them away.",
    "A red fox sleeps under an old oak tree at the edge of the forest. Its tail is wrapped around its nose "
    "to keep it warm, and the fallen leaves make a soft, quiet bed. When the sun goes down, the fox wakes up, "
    "stretches, and trots through the tall grass to look for mice, beetles and berries.",
    "What color is the circle in the picture? The circle is blue, the square next to it is green, and the "
    "small triangle at the top is yellow. Shapes and colors are among the first things a child learns to "
    "name; later come textures, shadows, and the way light changes a scene in the morning and the evening.",
    "Make the sky purple and add a few stars. An artist can paint a night scene with deep violet, dark "
    "navy and a touch of pink near the horizon. A few bright stars, a thin crescent, and the outline of "
    "distant hills are enough to turn a simple landscape into a calm and dreamy picture.",
    "A watercolor painting of a lighthouse at sunset shows a white tower standing on black rocks. Waves "
    "break against the shore, gulls circle overhead, and the warm orange light of the lamp mixes with the "
    "red and gold clouds. Watercolor is hard to control: the paint flows, the paper bends, and every "
    "brush stroke stays visible.",
    "You should first think about the planning process in the mind and then generate the image. Planning "
    "means deciding what goes where: the subject, the background, the lighting, the camera angle, and the "
    "mood. A good plan is short, clear, and specific, for example: \"a small cabin by a frozen lake, "
    "smoke rising from the chimney, snow on the pine trees, soft blue light before dawn.\"",
    "Numbers matter too. There are 7 days in a week, 12 months in a year, 24 hours in a day, 60 minutes in "
    "an hour and 365 days in most years. The recipe needs 2 cups of flour, 3 eggs, 150 grams of sugar and "
    "a pinch of salt; bake it at 180 degrees for 35 to 40 minutes (or until golden).",
    "People often ask questions like: Why is the sky blue? How do birds know where to fly in winter? What "
    "makes a rainbow? Scientists answer them with careful observations, simple experiments and patient "
    "reasoning. Sunlight is scattered by the air, birds follow the stars and the magnetic field of the "
    "planet, and a rainbow appears when light bends inside millions of tiny drops of water.",
    "In the city, trains arrive every few minutes, cafes open early, and the streets smell of fresh bread "
    "and coffee. In the countryside, the farmer feeds the horses, the dog chases the chickens, and the "
    "children walk along a narrow path between the fields of wheat and sunflowers.",
    "Good writing is honest, brief and concrete. Use strong verbs, avoid vague words, and read your "
    "sentences aloud. If a paragraph does not help the reader, cut it. If a word is not needed, remove it. "
    "Then rest, return with fresh eyes, and edit once more.",
    "The old museum keeps a collection of maps, clocks, musical instruments and strange machines. One "
    "room holds a bronze telescope that a sailor carried across three oceans; another displays jewelry, "
    "porcelain, and a quilt sewn by hand over twenty winters. Visitors whisper, because the building "
    "echoes like a cathedral.",
    "Kayaks glide quickly over the glassy bay while a jazz quartet rehearses on the pier. Zebras, "
    "giraffes and buffalo graze on the savanna far away, but here the only wildlife is a squirrel, "
    "two pigeons and an extremely curious puppy named Biscuit who wants everybody's sandwich.",
)

MAX_TINY_VOCAB_SIZE = 1280
"""Largest BPE vocabulary the embedded corpus can fill (checked when writing)."""

_BYTE_ALPHABET_SIZE = 256


def train_tiny_tokenizer(vocab_size: int = 1000) -> Tokenizer:
    """Train the byte-level BPE (`vocab_size` entries, ids 0..vocab_size-1) and append the Qwen2.5
    added tokens at ids vocab_size, vocab_size+1, ... in their official order."""
    if not _BYTE_ALPHABET_SIZE <= vocab_size <= MAX_TINY_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [{_BYTE_ALPHABET_SIZE}, {MAX_TINY_VOCAB_SIZE}] "
            "(the byte alphabet is 256 symbols; the embedded corpus supports no more merges)"
        )
    tokenizer = Tokenizer.from_str(json.dumps(_PIPELINE))
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=False)
    if trained != vocab_size:
        raise ValueError(f"BPE training reached {trained} entries, not vocab_size={vocab_size}")
    for content, special in QWEN2_ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        added = tokenizer.add_special_tokens([token]) if special else tokenizer.add_tokens([token])
        if added != 1:
            raise ValueError(f"could not add {content!r} to the tiny tokenizer (already in the BPE vocabulary?)")
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    """`tokenizer_config.json` as `Qwen2Tokenizer.save_pretrained` writes it for Qwen2.5 (sorted keys)."""
    decoder = {
        str(tokenizer.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN2_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(QWEN2_ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tiny_tokenizer(folder: Path, vocab_size: int = 1000) -> None:
    """Write `tokenizer.json`, `vocab.json`, `merges.txt` and `tokenizer_config.json` into `folder`.

    The BPE vocabulary has `vocab_size` entries; the 22 Qwen2.5 added tokens follow it, so
    `<|im_start|>` is `vocab_size + 1` and `<|vision_start|>` is `vocab_size + 9`. Same bytes
    on every run with the same `tokenizers` version.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(vocab_size)
    text = tokenizer.to_str(pretty=True)
    model = json.loads(text)["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges: list[str] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    # The official files: one-line vocab without a trailing newline, merges with a version header.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    config = json.dumps(_tokenizer_config(tokenizer), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(config, encoding="utf-8")
