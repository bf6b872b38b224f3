"""Pin the offline CLIP tokenizer to the reference tokenizer's ids.

Expected ids were produced by transformers 4.19.2's ``CLIPTokenizer.from_pretrained`` (the
reference ControlNet's version, pure-Python tokenizer, ftfy 6 installed) on the files in
``ldm/modules/encoders/clip_tokenizer``; open_clip's ``SimpleTokenizer`` agrees on all of them
except special-token strings typed into a prompt (open_clip 3 names them differently).
"""

import json

import pytest
import torch

from ldm.modules.encoders.tokenizer import TOKENIZER_DIR, load_clip_tokenizer, tokenize

BOS, EOS = 49406, 49407

# prompt -> ids before padding (BOS ... EOS); ftfy does not change these prompts.
PINNED = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "": [BOS, EOS],
    "   ": [BOS, EOS],
    "A PHOTO of a Cat!!": [BOS, 320, 1125, 539, 320, 2368, 748, EOS],
    "Hello, world... it's 2023; 3.14 & 42%": [
        BOS, 3306, 267, 1002, 678, 585, 568, 273, 271, 273, 274, 282, 274, 269, 272, 275, 261, 275, 273, 260, EOS,
    ],
    "  lots   of\twhitespace\n\nhere  ": [BOS, 2958, 539, 4699, 2138, 763, EOS],
    "café naïve résumé Ünïcödé": [
        BOS, 15304, 1097, 35689, 563, 29106, 7054, 4166, 6522, 77, 35689, 66, 7255, 67, 4166, EOS,
    ],
    "e\u0301 combining vs \u00e9 precomposed": [BOS, 4166, 23561, 1547, 4166, 679, 19916, EOS],
    "日本語のテキスト 🐱🚀": [
        BOS, 39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 35710, 13542, EOS,
    ],
    "masterpiece, best quality, ultra-detailed, 8k, RAW photo": [
        BOS, 12066, 267, 949, 3027, 267, 8118, 268, 12609, 267, 279, 330, 267, 6323, 1125, EOS,
    ],
    "1024x768, 16:9 aspect, $5.99": [
        BOS, 272, 271, 273, 275, 343, 278, 277, 279, 267, 272, 277, 281, 280, 19681, 267, 259, 276, 269, 280, 280, EOS,
    ],
    "TEST-123_abc/def\\ghi": [BOS, 1628, 268, 272, 273, 274, 318, 5334, 270, 11649, 315, 22279, EOS],
    "a <|endoftext|> b": [BOS, 320, EOS, 321, EOS],
}

# prompt -> (reference ids, i.e. with ftfy.fix_text; ids without ftfy)
FTFY_SENSITIVE = {
    "don\u2019t \u201cquote\u201d me": (
        [BOS, 847, 713, 257, 4020, 257, 614, EOS],
        [BOS, 847, 728, 503, 339, 728, 506, 4020, 728, 507, 614, EOS],
    ),
    "the \ufb01nest \ufb02owers": (
        [BOS, 518, 7707, 4023, EOS],
        [BOS, 518, 171, 105, 223, 8719, 171, 105, 224, 2032, 612, EOS],
    ),
    "fish &amp; chips &lt;3": (
        [BOS, 2759, 261, 8855, 283, 274, EOS],
        [BOS, 2759, 261, 6259, 282, 8855, 261, 3333, 282, 274, EOS],
    ),
    "\uff26\uff35\uff2c\uff2c width \uff11\uff12\uff13": (
        [BOS, 1476, 23571, 272, 273, 274, EOS],
        [BOS] + [171, 121, 228, 171, 121, 243, 171, 121, 234, 171, 121, 490, 23571]
        + [171, 120, 495, 171, 120, 496, 171, 120, 497, EOS],
    ),
    "caf\u00c3\u00a9 mojibake": (
        [BOS, 15304, 617, 3252, 11878, EOS],
        [BOS, 3471, 127, 352, 5811, 617, 3252, 11878, EOS],
    ),
    "a &amp; b <|endoftext|> c &amp; d": (
        [BOS, 320, 261, 321, EOS, 322, 261, 323, EOS],
        [BOS, 320, 261, 6259, 282, 321, EOS, 322, 261, 6259, 282, 323, EOS],
    ),
}


def padded(ids: list[int], length: int = 77) -> list[int]:
    return ids + [EOS] * (length - len(ids))


@pytest.fixture(scope="module")
def clip_tok():
    return load_clip_tokenizer()


def test_vocab_file_layout():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["Ā"] == 188  # first remapped byte (0x00) after the 188 printable bytes
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["in"] == 512 and vocab["cat</w>"] == 2368


def test_merges_file_layout():
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = lines[1:]
    assert len(merges) == 48894
    assert merges[:2] == ["i n", "t h"]
    assert all(len(m.split(" ")) == 2 for m in merges)
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert all(vocab[m.replace(" ", "")] == 512 + i for i, m in enumerate(merges))


def test_loaded_tokenizer_properties(clip_tok):
    assert len(clip_tok) == 49408
    assert (clip_tok.bos_token_id, clip_tok.eos_token_id, clip_tok.pad_token_id) == (BOS, EOS, EOS)
    assert clip_tok.model_max_length == 77


def test_missing_files_raise_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_clip_tokenizer_files"):
        load_clip_tokenizer(tmp_path)


def test_cat_prompt_exact(clip_tok):
    out = tokenize(clip_tok, ["a photo of a cat"])
    assert out.dtype == torch.long
    assert out.shape == (1, 77)
    assert out[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (out[0, 7:] == EOS).all()


@pytest.mark.parametrize("prompt", list(PINNED))
def test_pinned_prompts(clip_tok, prompt):
    assert tokenize(clip_tok, [prompt])[0].tolist() == padded(PINNED[prompt])


def test_batch_matches_single(clip_tok):
    prompts = list(PINNED)
    batch = tokenize(clip_tok, prompts)
    assert batch.shape == (len(prompts), 77)
    assert batch.tolist() == [padded(PINNED[p]) for p in prompts]


def test_truncation_keeps_eos_last(clip_tok):
    long_prompt = "a photo of a cat, " * 20  # 120 BPE tokens
    expected = [BOS] + ([320, 1125, 539, 320, 2368, 267] * 13)[:75] + [EOS]
    assert tokenize(clip_tok, [long_prompt])[0].tolist() == expected
    assert tokenize(clip_tok, ["word " * 80 + "end"])[0].tolist() == [BOS] + [2653] * 75 + [EOS]


def test_custom_max_length_and_empty_batch(clip_tok):
    out = tokenize(clip_tok, ["a photo of a cat", "a photo of a cat, " * 20], max_length=10)
    assert out.tolist() == [
        [BOS, 320, 1125, 539, 320, 2368, EOS, EOS, EOS, EOS],
        [BOS, 320, 1125, 539, 320, 2368, 267, 320, 1125, EOS],
    ]
    assert tokenize(clip_tok, []).shape == (0, 77)
    with pytest.raises(TypeError):
        tokenize(clip_tok, "a photo of a cat")  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", list(FTFY_SENSITIVE))
def test_ftfy_prompts_match_reference(clip_tok, prompt):
    assert tokenize(clip_tok, [prompt])[0].tolist() == padded(FTFY_SENSITIVE[prompt][0])


