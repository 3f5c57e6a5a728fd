"""The demo model's corpus: Jane Austen's six novels, as Debian packages them.

Source: Debian 12 (bookworm) package r-cran-janeaustenr 1.0.0-1 (CRAN janeaustenr 1.0.0 by
Julia Silge, MIT licence; the novels themselves, from Project Gutenberg, are in the public
domain). The .deb is fetched with `apt-get download` and checked against its SHA-256, then
read without R (see rdata.py).

Preprocessing, all deterministic:
- each novel's lines are grouped into paragraphs (blank-line separated, lines joined with a
  space); text before the first chapter heading (title, author), chapter and volume
  headings, "FINIS"/"THE END", bracketed editorial notes and `* * *` rules are dropped;
  Gutenberg's `_italics_` underscores are removed;
- a chapter becomes one document: its paragraphs joined by a blank line;
- held out: the last 5% of each novel's paragraphs (by words), a contiguous span, so the
  validation text is prose the model never saw;
- chat examples are built from the training paragraphs only (see `chat_examples`).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from models.demo_training.rdata import read_lazyload_db

PACKAGE = "r-cran-janeaustenr"
VERSION = "1.0.0-1"
SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data/"
VALID_FRACTION = 0.05

NOVELS = {  # the package's object name -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
# Principal characters, for "Tell me about <name>." prompts over passages that mention them.
CHARACTERS = (
    "Elinor", "Marianne", "Willoughby", "Colonel Brandon", "Edward", "Lucy", "Mrs. Jennings",
    "Elizabeth", "Mr. Darcy", "Jane", "Mr. Bingley", "Wickham", "Lydia", "Mr. Collins", "Lady Catherine",
    "Mrs. Bennet", "Mr. Bennet", "Charlotte", "Fanny", "Edmund", "Miss Crawford", "Henry Crawford",
    "Sir Thomas", "Mrs. Norris", "Lady Bertram", "Emma", "Mr. Knightley", "Harriet", "Mr. Elton",
    "Frank Churchill", "Jane Fairfax", "Mrs. Weston", "Mr. Woodhouse", "Miss Bates", "Catherine",
    "Henry Tilney", "Isabella", "John Thorpe", "Eleanor", "General Tilney", "Mrs. Allen", "Anne",
    "Captain Wentworth", "Sir Walter", "Lady Russell", "Louisa", "Mr. Elliot",
)
_SKIP = re.compile(r"^(chapter|volume)\b|^(finis|the end)\.?$|^\[.*\]$|^[* ]+$", re.IGNORECASE)
_QUOTED = re.compile(r'"([^"]+)"')


@dataclass
class Corpus:
    train: list[str]  # documents: one chapter each (paragraphs joined by a blank line)
    valid: list[str]  # the held-out end of each novel, one document per novel
    chat: list[list[dict]] = field(default_factory=list)  # conversations built from training prose

    def words(self) -> tuple[int, int]:
        return sum(len(d.split()) for d in self.train), sum(len(d.split()) for d in self.valid)


def fetch_package(cache_dir: Path) -> Path:
    """The .deb in `cache_dir`, downloaded with apt-get if absent; refused if its hash differs."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    deb = cache_dir / f"{PACKAGE}_{VERSION}_all.deb"
    if not deb.exists():
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=cache_dir, check=True)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ValueError(f"{deb} has SHA-256 {digest}, expected {SHA256} ({PACKAGE} {VERSION})")
    return deb


def read_novels(deb: Path) -> dict[str, list[str]]:
    """Each novel's lines, read from the package's R data without installing it."""
    data_tar = _ar_member(deb.read_bytes(), b"data.tar.xz")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:xz") as tar:
        for name in ("Rdata.rdx", "Rdata.rdb"):
            member = tar.getmember("./" + _DATA_DIR + name)
            (Path(tmp) / name).write_bytes(tar.extractfile(member).read())
        objects = read_lazyload_db(Path(tmp) / "Rdata.rdx")
    return {name: objects[name] for name in NOVELS}


def _ar_member(archive: bytes, name: bytes) -> bytes:
    """A member of a Debian package (an `ar` archive: 8-byte magic, then 60-byte headers)."""
    if archive[:8] != b"!<arch>\n":
        raise ValueError("not a Debian package (ar archive)")
    pos = 8
    while pos < len(archive):
        header = archive[pos : pos + 60]
        size = int(header[48:58])
        if header[:16].strip().rstrip(b"/") == name:
            return archive[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    raise ValueError(f"{name.decode()} not found in the package")


def chapters(lines: list[str]) -> list[list[str]]:
    """The novel's chapters, each a list of cleaned paragraphs."""
    result: list[list[str]] = []
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            paragraph.append(line.strip())
            continue
        if not paragraph:
            continue
        text = " ".join(paragraph).replace("_", "")
        text = re.sub(r"\s+", " ", text).strip()
        paragraph = []
        if re.match(r"^chapter\b", text, re.IGNORECASE):
            result.append([])
        elif result and text and not _SKIP.match(text):
            result[-1].append(text)
    return [c for c in result if c]


def split_novel(novel: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """(training chapters, held-out paragraphs): the held-out part is the novel's last
    VALID_FRACTION of words, cut at a paragraph boundary."""
    paragraphs = [(ci, p) for ci, chapter in enumerate(novel) for p in chapter]
    total = sum(len(p.split()) for _, p in paragraphs)
    held, words = len(paragraphs), 0
    while words < VALID_FRACTION * total:
        held -= 1
        words += len(paragraphs[held][1].split())
    train: list[list[str]] = [[] for _ in novel]
    for ci, p in paragraphs[:held]:
        train[ci].append(p)
    return [c for c in train if c], [p for _, p in paragraphs[held:]]


def build_corpus(cache_dir: Path, seed: int) -> Corpus:
    novels = read_novels(fetch_package(cache_dir))
    train_chapters: list[list[str]] = []
    valid: list[str] = []
    for name in NOVELS:
        train, held = split_novel(chapters(novels[name]))
        train_chapters += train
        valid.append("\n\n".join(held))
    chat = chat_examples(train_chapters, random.Random(seed))
    return Corpus(["\n\n".join(c) for c in train_chapters], valid, chat)


# --- chat examples ---------------------------------------------------------------------

_STORY_PROMPTS = (
    "Tell me a story.",
    "Tell me a story, please.",
    "Can you tell me a story?",
    "Write a short passage in the style of Jane Austen.",
    "Write a paragraph from a novel.",
)
_CHARACTER_PROMPTS = ("Tell me about {name}.", "Write a story about {name}.", "What happened to {name}?")
_CONTINUE_PROMPTS = ("Continue the story: {start}", "Go on with this passage: {start}")
PASSAGE_FRACTION = 0.35  # of the training passages, those that also become a chat example
SYSTEM_FRACTION = 0.2  # of the examples, those that start with a system message
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a storyteller.", "You write in the style of Jane Austen.")


def chat_examples(train_chapters: list[list[str]], rng: random.Random) -> list[list[dict]]:
    """Conversations made from the training prose; what each kind is:

    - dialogue: a run of 2-6 consecutive paragraphs that are all quoted speech becomes a
      conversation, the quoted words only (attributions such as `said he` dropped), turns
      alternating user, assistant, ...; it ends on an assistant turn;
    - story: a passage (consecutive paragraphs of one chapter, 40-180 words; a random
      PASSAGE_FRACTION of all passages become examples) answers a fixed
      request such as "Tell me a story." or, when the passage names a principal character,
      "Tell me about <name>.";
    - continuation: the first sentence of a passage is the user's text after "Continue the
      story:", the rest of the passage the answer.

    A random SYSTEM_FRACTION of them start with a short system message, so that a system turn
    is not new to the model.
    """
    examples: list[list[dict]] = []
    for chapter in train_chapters:
        examples += _dialogues(chapter, rng)
        for passage in _passages(chapter, rng):
            if rng.random() < PASSAGE_FRACTION:
                examples.append(_passage_example(passage, rng))
    examples = [[{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}, *m] if rng.random() < SYSTEM_FRACTION
                else m for m in examples]
    rng.shuffle(examples)
    return examples


def _speech(paragraph: str) -> str | None:
    """The quoted words of a paragraph that is speech (balanced quotes), joined; else None."""
    if paragraph.count('"') < 2 or paragraph.count('"') % 2:
        return None
    parts = [p.strip() for p in _QUOTED.findall(paragraph)]
    text = " ".join(p for p in parts if p)
    return text if len(text.split()) >= 3 else None


def _dialogues(chapter: list[str], rng: random.Random) -> list[list[dict]]:
    speeches = [_speech(p) for p in chapter]
    result, i = [], 0
    while i < len(speeches):
        if speeches[i] is None:
            i += 1
            continue
        run, limit = [], rng.randint(2, 6)
        while i < len(speeches) and speeches[i] is not None and len(run) < limit:
            run.append(speeches[i])
            i += 1
        if len(run) % 2:
            run = run[:-1]
        if run:
            roles = ["user", "assistant"] * (len(run) // 2)
            result.append([{"role": r, "content": t} for r, t in zip(roles, run, strict=True)])
    return result


def _passages(chapter: list[str], rng: random.Random) -> list[str]:
    """Consecutive paragraphs grouped into passages of 40-180 words."""
    result, current, words = [], [], 0
    target = rng.randint(40, 180)
    for p in chapter:
        n = len(p.split())
        if current and words + n > 180:
            result.append("\n\n".join(current))
            current, words, target = [], 0, rng.randint(40, 180)
        current.append(p)
        words += n
        if words >= target:
            result.append("\n\n".join(current))
            current, words, target = [], 0, rng.randint(40, 180)
    return [r for r in result if 40 <= len(r.split()) <= 180]


def _passage_example(passage: str, rng: random.Random) -> list[dict]:
    kind = rng.random()
    named = [n for n in CHARACTERS if re.search(rf"\b{re.escape(n)}\b", passage)]
    if kind < 0.35 and named:
        name = max(named, key=lambda n: passage.count(n))
        return _turns(rng.choice(_CHARACTER_PROMPTS).format(name=name), passage)
    if kind < 0.65:
        sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", passage, maxsplit=1)
        if len(sentences) == 2 and len(sentences[1].split()) >= 20:
            return _turns(rng.choice(_CONTINUE_PROMPTS).format(start=sentences[0]), sentences[1])
    return _turns(rng.choice(_STORY_PROMPTS), passage)


def _turns(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
