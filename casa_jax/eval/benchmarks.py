"""Evaluation items from three public multimodal safety benchmarks a user has on disk (none is vendored).

``load_benchmark(name, root, limit=None, **options)`` returns ``Item``s (all harmful) in a deterministic
order. The layouts expected under ``root``:

``mmsafetybench`` (MM-SafetyBench repo root, or its ``data`` folder)::

    data/processed_questions/<scenario>.json   {"0": {"Question", "Changed Question", "Key Phrase",
                                                "Phrase Type", "Rephrased Question", "Rephrased Question(SD)"}, ...}
    data/imgs/<scenario>/{SD,SD_TYPO,TYPO}/<key>.jpg

  Scenarios ``01-Illegal_Activitiy`` (sic) ... ``13-Gov_Decision``; only those with a JSON file are loaded.
  SD images pair with "Rephrased Question(SD)", SD_TYPO and TYPO with "Rephrased Question"; the request
  is "Question". Suites ``mmsb_sd``, ``mmsb_sd_typo``, ``mmsb_typo``; ids ``mmsb/<scenario>/<key>``.
  Options: ``image_types``, ``scenarios`` (names or number prefixes such as "01"); ``limit`` is per scenario.

``jailbreakv`` (the ``JailBreakV_28K`` folder, or its parent)::

    JailBreakV_28K.csv, mini_JailBreakV_28K.csv (280 rows), RedTeam_2K.csv,
    figstep/, llm_transfer_attack/, query_related/     (images; ``image_path`` is relative to the folder)
    header: id,jailbreak_query,redteam_query,format,policy,image_path,from,selected_mini,transfer_from_llm

  prompt = jailbreak_query, request = redteam_query; suite ``jbv_<format lowercased>`` (template, persuade,
  logic, figstep, sd, typo, sd_typo); id ``jbv/<id>``. Options: ``mini`` (default True), ``formats``.

``safebench`` (FigStep repo root, or its ``data`` folder)::

    data/question/safebench.csv   columns dataset,category_id,task_id,category_name,question,instruction
    data/images/SafeBench/query_ForbidQI_{category_id}_{task_id}_6.png

  prompt = FigStep's fixed text prompt, request = question; suite ``safebench_figstep``; id
  ``safebench/<category_id>_<task_id>``.

Images are ``ImageFile``s: checked to exist at load time, decoded to RGB only when used, so a benchmark's
thousands of images do not sit in memory. Layout problems raise ``InputError`` naming the path and what was
expected.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from casa_jax.attacks.images import FIGSTEP_INSTRUCTION
from casa_jax.eval.suites import Item
from casa_jax.processing import InputError

BENCHMARKS = ("mmsafetybench", "jailbreakv", "safebench")
MMSB_SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm",
                  "05-EconomicHarm", "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence",
                  "10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
MMSB_QUESTION = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}
JBV_FORMATS = ("Template", "Persuade", "Logic", "figstep", "SD", "typo", "SD_typo")
JBV_COLUMNS = ("id", "jailbreak_query", "redteam_query", "format", "image_path")
SAFEBENCH_COLUMNS = ("category_id", "task_id", "question")
BENCHMARK_SUITES = (*(f"mmsb_{t.lower()}" for t in MMSB_QUESTION), *(f"jbv_{f.lower()}" for f in JBV_FORMATS),
                    "safebench_figstep")  # every suite these loaders emit; all are image suites


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """An image file decoded to RGB on use; quacks like a PIL image (``size``, ``convert``) and an array."""

    path: str

    def _read(self, fn):
        from PIL import Image
        try:
            with Image.open(self.path) as im:
                return fn(im)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read as an image ({e})") from e

    def open(self):
        """The decoded RGB ``PIL.Image`` (the file is closed again)."""
        return self._read(lambda im: im.convert("RGB"))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the file header, without decoding the pixels."""
        return self._read(lambda im: im.size)

    def convert(self, mode: str = "RGB"):
        return self.open().convert(mode)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.open(), dtype=dtype)


def load_benchmark(name: str, root: str, limit: int | None = None, **options) -> list[Item]:
    """Items of benchmark ``name`` (one of ``BENCHMARKS``) found under ``root``; see the module docstring."""
    loaders = {"mmsafetybench": load_mmsafetybench, "jailbreakv": load_jailbreakv, "safebench": load_safebench}
    if name not in loaders:
        raise InputError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    return loaders[name](root, limit=limit, **options)


def _need_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise InputError(f"{path}: folder not found; expected {what}")
    return path


def _image(path: str, where: str) -> ImageFile:
    if not os.path.isfile(path):
        raise InputError(f"{path}: image file not found (for {where})")
    return ImageFile(path)


def _read_csv(path: str, columns: Sequence[str]) -> list[dict]:
    """The rows of a CSV file with at least ``columns`` in its header."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}, "
                             f"expected {list(columns)} among them")
        return list(reader)


def _numeric(key: str) -> tuple:
    """Sort key putting "2" before "10" (digit strings by value, others after them by text)."""
    return (not key.isdigit(), int(key) if key.isdigit() else 0, key)


def _data_dir(root: str, inner: str) -> str:
    """``root/data`` when it holds ``inner``, else ``root`` (a user may point at the repo or at ``data``)."""
    return os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data", inner)) else root


def _choose(wanted: Iterable[str] | None, present: Sequence[str], what: str, where: str, match) -> list[str]:
    """The ``present`` names that ``match`` some ``wanted`` one (all when None); unmatched ones are errors."""
    if wanted is None:
        return list(present)
    wanted = list(wanted)
    unknown = [w for w in wanted if not any(match(w, p) for p in present)]
    if unknown:
        raise InputError(f"{where}: {what} {unknown} not found; available: {list(present)}")
    return [p for p in present if any(match(w, p) for w in wanted)]


def _mmsb_questions(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise InputError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f'{path}: expected a JSON object keyed "0", "1", ... of question objects')
    return data


def load_mmsafetybench(root: str, image_types: Iterable[str] = ("SD", "SD_TYPO", "TYPO"),
                       scenarios: Iterable[str] | None = None, limit: int | None = None) -> list[Item]:
    """MM-SafetyBench items: per image type, scenario and question key (``limit`` questions per scenario)."""
    data = _data_dir(root, "processed_questions")
    qdir = _need_dir(os.path.join(data, "processed_questions"), "MM-SafetyBench's data/processed_questions/")
    present = sorted(f[:-5] for f in os.listdir(qdir) if f.endswith(".json"))
    if not present:
        raise InputError(f"{qdir}: no <scenario>.json files (expected e.g. {MMSB_SCENARIOS[0]}.json)")
    chosen = _choose(scenarios, present, "scenarios", qdir, lambda w, p: w in (p, p.split("-")[0]))
    types = _choose(image_types, list(MMSB_QUESTION), "image types", root, lambda w, t: w.upper() == t)
    imgs = _need_dir(os.path.join(data, "imgs"), "MM-SafetyBench's data/imgs/<scenario>/{SD,SD_TYPO,TYPO}/")
    questions = {s: _mmsb_questions(os.path.join(qdir, f"{s}.json")) for s in chosen}
    items = []
    for kind in types:
        field = MMSB_QUESTION[kind]
        for scenario in chosen:
            folder = _need_dir(os.path.join(imgs, scenario, kind), f"the {kind} images of {scenario}")
            for key in sorted(questions[scenario], key=_numeric)[:limit]:
                q, where = questions[scenario][key], f"{qdir}/{scenario}.json key {key!r}"
                missing = [k for k in ("Question", field) if not isinstance(q.get(k), str)]
                if missing:
                    raise InputError(f"{where}: missing string field(s) {missing}")
                image = _image(os.path.join(folder, f"{key}.jpg"), where)
                items.append(Item(f"mmsb/{scenario}/{key}", f"mmsb_{kind.lower()}", True, q[field], q["Question"],
                                  image=image))
    return items


def load_jailbreakv(root: str, mini: bool = True, formats: Iterable[str] | None = None,
                    limit: int | None = None) -> list[Item]:
    """JailBreakV-28K items (the 280-row mini set by default), by id, optionally only some ``formats``."""
    folder = os.path.join(root, "JailBreakV_28K")
    folder = folder if os.path.isdir(folder) else _need_dir(root, "the JailBreakV_28K folder")
    path = os.path.join(folder, "mini_JailBreakV_28K.csv" if mini else "JailBreakV_28K.csv")
    rows = sorted(_read_csv(path, JBV_COLUMNS), key=lambda r: _numeric(r["id"]))
    keep = {f.lower() for f in _choose(formats, JBV_FORMATS, "formats", path, lambda w, f: w.lower() == f.lower())}
    items = []
    for r in [r for r in rows if r["format"].lower() in keep][:limit]:
        where = f"{path} id {r['id']}"
        image = _image(os.path.join(folder, r["image_path"]), where) if r["image_path"] else None
        items.append(Item(f"jbv/{r['id']}", f"jbv_{r['format'].lower()}", True, r["jailbreak_query"],
                          r["redteam_query"], image=image))
    return items


def load_safebench(root: str, limit: int | None = None) -> list[Item]:
    """FigStep's SafeBench: each question's typographic PNG with FigStep's fixed text prompt."""
    data = _data_dir(root, "question")
    path = os.path.join(data, "question", "safebench.csv")
    rows = _read_csv(path, SAFEBENCH_COLUMNS)
    rows.sort(key=lambda r: (_numeric(r["category_id"]), _numeric(r["task_id"])))
    images = _need_dir(os.path.join(data, "images", "SafeBench"), "FigStep's data/images/SafeBench/ PNGs")
    items = []
    for r in rows[:limit]:
        name = f"query_ForbidQI_{r['category_id']}_{r['task_id']}_6.png"
        image = _image(os.path.join(images, name), f"{path} category {r['category_id']} task {r['task_id']}")
        items.append(Item(f"safebench/{r['category_id']}_{r['task_id']}", "safebench_figstep", True,
                          FIGSTEP_INSTRUCTION, r["question"], image=image))
    return items
