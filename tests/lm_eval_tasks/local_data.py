"""The tasks' items, read from the JSON Lines file beside their YAML: a relative `data_files` would be
resolved against the working directory, so the tasks would only load when lm-eval runs from one folder.
Called by lm-eval as `custom_dataset` with the task's metadata as keywords, which these loaders do not need."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

HERE = Path(__file__).parent


def _test_split(name: str) -> DatasetDict:
    lines = (HERE / name).read_text().splitlines()
    return DatasetDict({"test": Dataset.from_list([json.loads(line) for line in lines if line])})


def capitals(**metadata: Any) -> DatasetDict:
    return _test_split("capitals.jsonl")


def short_answers(**metadata: Any) -> DatasetDict:
    return _test_split("short_answers.jsonl")
