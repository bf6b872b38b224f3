"""Derive the Hugging Face CLIP tokenizer files from OpenAI's BPE merges file.

The reference ControlNet loads ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")``.
That tokenizer's ``vocab.json`` and ``merges.txt`` are a re-encoding of OpenAI CLIP's
``bpe_simple_vocab_16e6.txt.gz`` (MIT license), which ships inside the ``open-clip-torch``
wheel on PyPI. This script rebuilds both files offline and deterministically:

    pip download --no-deps open-clip-torch -d /tmp/dl
    python -m tools.make_clip_tokenizer_files /tmp/dl/open_clip_torch-*.whl

The argument may be the wheel (``.whl``) or the ``.gz`` file itself.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import zipfile
from pathlib import Path

GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48894, the slice OpenAI CLIP keeps
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
VOCAB_SIZE = 49408
MERGES_HEADER = "#version: 0.2"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ldm" / "modules" / "encoders" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, in CLIP/GPT-2 order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def read_gz_bytes(path: Path) -> bytes:
    """Return the compressed merges file, from a wheel or a bare ``.gz``."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            names = [n for n in wheel.namelist() if n.endswith("/" + GZ_NAME)]
            if len(names) != 1:
                raise SystemExit(f"{path}: expected one {GZ_NAME}, found {names}")
            return wheel.read(names[0])
    return path.read_bytes()


def parse_merges(gz_bytes: bytes) -> list[tuple[str, str]]:
    """Return the first 48894 merge pairs (the header line is skipped)."""
    lines = gzip.decompress(gz_bytes).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if len(merges) != N_MERGES or bad:
        raise SystemExit(f"unexpected merges file: {len(merges)} merges, {len(bad)} malformed")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Build the 49408-entry token -> id map in CLIP order."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"vocab has {len(vocab)} unique tokens, expected {VOCAB_SIZE}")
    return vocab


def write_files(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (UTF-8, LF, trailing newline)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    with open(out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help=f"open_clip_torch wheel or {GZ_NAME}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)

    gz_bytes = read_gz_bytes(args.source)
    merges = parse_merges(gz_bytes)
    vocab = build_vocab(merges)
    write_files(vocab, merges, args.out)
    print(f"source {GZ_NAME} sha256 {hashlib.sha256(gz_bytes).hexdigest()}")
    for name in ("vocab.json", "merges.txt"):
        digest = hashlib.sha256((args.out / name).read_bytes()).hexdigest()
        print(f"wrote {args.out / name} sha256 {digest}")


if __name__ == "__main__":
    main()
