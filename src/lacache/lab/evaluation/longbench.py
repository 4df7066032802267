"""LongBench (English datasets) under a bounded KV cache: official prompts, lengths and scorer.

Records come in the official layout, one JSON object per line with ``input``, ``context``,
``answers``, ``all_classes``, ``length``, ``dataset``, ``language`` and ``_id``: either a folder of
``<dataset>.jsonl`` / ``<dataset>_e.jsonl`` files (what the official ``data.zip`` unpacks to) or the
hub dataset through ``datasets``. Each record is filled into its dataset's official template,
wrapped in the model's chat template except for the few-shot and code datasets (as the official
code does for chat models), answered greedily with a fresh cache of each method, and scored with
:mod:`lacache.lab.evaluation.metrics`.

The official code middle-truncates every prompt to the model's context length. That is off by
default here: a bounded cache is meant to read the whole context, and truncating would hide what it
forgets. ``max_length`` turns it on for comparisons with published numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..._lazy import torch
from ..progress import Progress, as_progress
from .common import greedy_answer
from .distributed import SINGLE, Shard
from .harness import Answer, check_prefill, run_trials
from .metrics import dataset_score, score_sample

__all__ = [
    "MAX_NEW_TOKENS",
    "PROMPTS",
    "RAW_DATASETS",
    "LongBenchRecord",
    "LongBenchTrial",
    "base_name",
    "check_dataset",
    "encode_prompt",
    "folder_datasets",
    "format_prompt",
    "load_folder",
    "load_hub",
    "run_longbench",
    "summarize",
    "summary_table",
    "trial_dicts",
    "truncate_middle",
    "uses_chat_template",
]

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    "based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
    "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)

# The official config/dataset2prompt.json for the English datasets, verbatim (typos included: the
# "asconcisely" of narrativeqa and qasper's leading space are part of the published prompts).
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
        + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
        + "\n\nQuestion: {input}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "musique": _QA_PASSAGES,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# The official config/dataset2maxlen.json: tokens generated per answer.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

# Datasets the official code feeds to chat models as raw text: few-shot and code completion prompts.
RAW_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})

_FIELDS = ("input", "context", "answers", "all_classes", "length", "dataset", "language", "_id")


def base_name(dataset: str) -> str:
    """The LongBench dataset a (possibly LongBench-E, ``*_e``) name stands for."""
    return dataset.removesuffix("_e")


def check_dataset(dataset: str) -> str:
    """``dataset`` itself if this harness has its prompt and metric; a ValueError naming the known ones if not."""
    if base_name(dataset) not in PROMPTS:
        raise ValueError(
            f"LongBench dataset {dataset!r} is not supported; known (English, each also as NAME_e for "
            f"LongBench-E): {', '.join(PROMPTS)}"
        )
    return dataset


@dataclass
class LongBenchRecord:
    dataset: str  # file / config name, e.g. "hotpotqa" or "hotpotqa_e"
    id: str
    input: str
    context: str
    answers: list[str]
    all_classes: list[str] | None
    length: int  # the official length field (words, or characters for Chinese), not tokens
    language: str = "en"

    @classmethod
    def from_row(cls, row: dict, dataset: str) -> LongBenchRecord:
        """A record from one official-layout row; a ``ValueError`` naming the field that is malformed
        (rather than a ``TypeError`` from the scorer, many minutes into a run)."""
        if not isinstance(row, dict):
            raise ValueError(f"{dataset}: a record must be a JSON object with {', '.join(_FIELDS)}; "
                             f"got {_json_kind(row)}")
        missing = [f for f in ("input", "context", "answers") if f not in row]
        if missing:
            raise ValueError(f"{dataset}: record {row.get('_id', '?')} lacks {', '.join(missing)}; "
                             f"the official layout has {', '.join(_FIELDS)}")
        where = f"{dataset}: record {row.get('_id', '?')}"
        if row["answers"] is None:
            raise ValueError(f'{where}: "answers" must be a list of strings, e.g. ["Paris"]; got null')
        return cls(dataset, str(row.get("_id", "")), _text(row, "input", where), _text(row, "context", where),
                   _strings(row, "answers", where), _strings(row, "all_classes", where),
                   _length(row.get("length"), where), _text(row, "language", where) or "en")


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words, for messages about malformed records."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _text(row: dict, field: str, where: str) -> str:
    """A string field (null reads as empty)."""
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f'{where}: "{field}" must be a string or null; got {_json_kind(value)}')
    return value


def _strings(row: dict, field: str, where: str) -> list[str] | None:
    """A list-of-strings field (one string reads as a list of one; null stays None)."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f'{where}: "{field}" must be a list of strings, e.g. ["Paris"]; got {_json_kind(value)}')
    return list(value)


def _length(value: object, where: str) -> int:
    """The official ``length`` (words): a whole number >= 0, possibly written as a string; missing reads as 0."""
    if value is None or value == "":
        return 0
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < 0:
        raise ValueError(f'{where}: "length" must be a whole number of words, e.g. 1234; got {_json_kind(value)}')
    return number


def folder_datasets(folder: str | Path) -> list[str]:
    """Dataset names present in ``folder`` (one ``<name>.jsonl`` each), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"LongBench data folder {str(folder)!r} does not exist; it should hold <dataset>.jsonl files")
    names = sorted(p.stem for p in folder.glob("*.jsonl"))
    if not names:
        raise ValueError(f"no <dataset>.jsonl files in {str(folder)!r}")
    return names


def _read_jsonl(path: Path, dataset: str, limit: int | None) -> list[LongBenchRecord]:
    """The records of one JSONL file; every malformed line is a ``ValueError`` naming ``path:line``."""
    records = []
    with open(path, "rb") as fh:  # decoded line by line, so a bad byte is reported with its line number
        for number, raw in enumerate(fh, 1):
            if limit is not None and len(records) >= limit:
                break
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte {err.start}: {err.reason}); the official "
                                 "files are UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err})") from None
            try:
                records.append(LongBenchRecord.from_row(row, dataset))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
    return records


def load_folder(folder: str | Path, datasets: Sequence[str] | None = None,
                limit: int | None = None) -> list[LongBenchRecord]:
    """Records of ``datasets`` (default: every file in ``folder``), at most ``limit`` of each."""
    available = folder_datasets(folder)
    chosen = list(datasets) if datasets else available
    for name in chosen:
        check_dataset(name)
        if name not in available:
            raise ValueError(f"{name}.jsonl is not in {str(folder)!r}; found: {', '.join(available)}")
    return [r for name in chosen for r in _read_jsonl(Path(folder) / f"{name}.jsonl", name, limit)]


def load_hub(hub_id: str = "THUDM/LongBench", datasets: Sequence[str] | None = None,
             limit: int | None = None) -> list[LongBenchRecord]:
    """The same records through ``datasets.load_dataset(hub_id, name, split="test")`` (needs internet)."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise ValueError("--dataset needs the `datasets` package (pip install datasets) and internet; "
                         "or unpack the official data.zip and pass --data DIR") from None
    records = []
    for name in datasets or list(PROMPTS):
        check_dataset(name)
        rows = hf_datasets.load_dataset(hub_id, name, split="test")
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        records.extend(LongBenchRecord.from_row(dict(row), name) for row in rows)
    return records


def format_prompt(record: LongBenchRecord) -> str:
    """The official template of the record's dataset, filled in."""
    return PROMPTS[base_name(check_dataset(record.dataset))].format(context=record.context, input=record.input)


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """The first and last ``max_length // 2`` tokens when longer (the official truncation: the
    instruction is at both ends, so the middle of the context is what goes)."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - half:]


def _truncate_text(tokenizer, prompt: str, max_length: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    kept = truncate_middle(ids, max_length)
    return (tokenizer.decode(kept[:half], skip_special_tokens=True)
            + tokenizer.decode(kept[half:], skip_special_tokens=True))


def uses_chat_template(tokenizer, dataset: str, use_chat_template: bool = True) -> bool:
    """Whether the prompt is wrapped as a user turn: chat models, except on the official raw datasets."""
    return (use_chat_template and bool(getattr(tokenizer, "chat_template", None))
            and base_name(dataset) not in RAW_DATASETS)


def encode_prompt(tokenizer, record: LongBenchRecord, use_chat_template: bool = True,
                  max_length: int | None = None) -> torch.Tensor:
    """Token ids [1, n] of the record's prompt: template, optional middle truncation, then chat wrap."""
    prompt = format_prompt(record)
    if max_length is not None:
        prompt = _truncate_text(tokenizer, prompt, max_length)
    if uses_chat_template(tokenizer, record.dataset, use_chat_template):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([list(ids)])


def _stop_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the tokenizer and the model's generation config (as ``generate`` stops).

    The official samsum run also stops at a newline, but only after a first token; greedy_answer
    cannot express "not first", so samsum runs to its length and post-processing keeps line one.
    """
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return {i for i in ids if i is not None}


@dataclass
class LongBenchTrial:
    method: str
    dataset: str
    id: str
    length: int  # prompt tokens, after template and any truncation
    slots: int | None  # cache slots per layer; None for the full cache
    prediction: str
    answers: list[str]
    score: float  # 0-100, the official per-sample score (best over answers) times 100
    seconds: float


def run_longbench(
    model,
    tokenizer,
    methods: Sequence[str],
    records: Iterable[LongBenchRecord],
    budget: float,
    prefill: str = "chunked",
    prefill_chunk: int = 512,
    method_options: dict[str, dict] | None = None,
    use_chat_template: bool = True,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    progress: bool | Progress = False,
    finished: Mapping[tuple, LongBenchTrial] | None = None,
    on_trial: Callable[[tuple, LongBenchTrial], None] | None = None,
    shard: Shard = SINGLE,
) -> list[LongBenchTrial]:
    """Every record x method: greedy answer with a fresh cache, scored as the official eval.py does.

    ``budget`` below 1 is a fraction of each prompt; 1 or more is slots per layer ("full" ignores
    it). ``max_new_tokens`` caps the official per-dataset answer length (for quick runs only).
    Trials are keyed ``(dataset, position in its dataset, id, method)`` (stable when ``--limit``
    grows or datasets are added): those in ``finished`` are reused, not run, and
    ``on_trial(key, trial)`` records each new one as it finishes (see ``harness.run_trials``).
    ``progress`` counts trials, one group per sample; ``shard`` splits the trials across the
    processes of a distributed launch (see ``harness.run_trials``).
    """
    check_prefill(prefill)
    records = list(records)
    for record in records:
        check_dataset(record.dataset)
    positions: dict[str, int] = {}
    keys = []  # per record: (dataset, position in its dataset, id)
    for record in records:
        positions[record.dataset] = positions.get(record.dataset, -1) + 1
        keys.append((record.dataset, positions[record.dataset], record.id))

    def prompts() -> Iterator[tuple[int, LongBenchRecord, torch.Tensor]]:
        for number, record in enumerate(records, 1):
            yield number, record, encode_prompt(tokenizer, record, use_chat_template, max_length)

    def answer_tokens(item: tuple[int, LongBenchRecord, torch.Tensor]) -> int:
        new_tokens = MAX_NEW_TOKENS[base_name(item[1].dataset)]
        return min(new_tokens, max_new_tokens) if max_new_tokens else new_tokens

    def score(item: tuple[int, LongBenchRecord, torch.Tensor], prediction: str) -> float:
        record = item[1]
        return 100 * score_sample(record.dataset, prediction, record.answers, record.all_classes)

    def trial(item: tuple[int, LongBenchRecord, torch.Tensor], run: Answer) -> LongBenchTrial:
        _, record, _ = item
        return LongBenchTrial(run.method, record.dataset, record.id, run.tokens, run.slots, run.text, record.answers,
                              round(run.score, 4), run.seconds)

    return run_trials(
        model, tokenizer, prompts(), methods, budget, input_ids=lambda item: item[2], score=score,
        make_trial=trial, new_tokens=answer_tokens, stop_ids=_stop_ids(model, tokenizer), prefill=prefill,
        prefill_chunk=prefill_chunk, method_options=method_options, answer=greedy_answer,
        trial_key=lambda item, method: (*keys[item[0] - 1], method), finished=finished, on_trial=on_trial,
        progress=as_progress(progress, "longbench"), shard=shard, prompt_count=len(records),
        group=lambda item: f"{item[1].dataset} sample {keys[item[0] - 1][1] + 1}, {int(item[2].shape[-1])} tokens",
    )


def summarize(trials: Sequence[LongBenchTrial]) -> dict[str, dict[str, float]]:
    """{method: {dataset: score, ..., "average": mean of the dataset scores}}, scores 0-100."""
    summary: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(t.method for t in trials):
        mine = [t for t in trials if t.method == method]
        scores = {d: dataset_score([t.score / 100 for t in mine if t.dataset == d])
                  for d in dict.fromkeys(t.dataset for t in mine)}
        scores["average"] = round(sum(scores.values()) / len(scores), 2)
        summary[method] = scores
    return summary


def summary_table(trials: Sequence[LongBenchTrial]) -> tuple[list[str], list[list]]:
    """Headers and rows: one row per method, one column per dataset, then the average."""
    summary = summarize(trials)
    datasets = list(dict.fromkeys(t.dataset for t in trials))
    headers = ["method", *datasets, "average"]
    return headers, [[m, *[s.get(d) for d in datasets], s["average"]] for m, s in summary.items()]


def trial_dicts(trials: Sequence[LongBenchTrial]) -> list[dict]:
    """The trials as JSON-ready dicts (every field, in order)."""
    return [asdict(t) for t in trials]
