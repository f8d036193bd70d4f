"""The run's shape, defined once: the DAG's id and schedule, its data steps in order (the
DAG, the in-process `run_all` and the CLI's `loraflow step` all read them), and the error a
step raises when the step before it has not run.

Standard library only: the DAG file imports this module at parse time.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DAG_ID = "lora_imdb_experiment"
DEFAULT_SCHEDULE = "@weekly"


def schedule() -> str | None:
    """`$LORAFLOW_SCHEDULE`: a cron expression or preset such as `@weekly` (UTC, the
    default); None for manual runs only (`none`, `null` or empty)."""
    value = os.environ.get("LORAFLOW_SCHEDULE", DEFAULT_SCHEDULE).strip()
    return None if value.lower() in ("", "none", "null") else value


class StepNotRun(FileNotFoundError):
    """What a step needs from an earlier step is missing: that step has not run (or its
    output was removed). A FileNotFoundError, not a ValueError: the DAG retries it (on a
    shared file system the output may not be visible yet), whereas a ValueError means bad
    input and fails at once."""

    def __init__(
        self, missing: object, step: str, *, again: bool = False, state: str = "is missing"
    ) -> None:
        super().__init__(f"{missing} {state}: run the {step} step {'again' if again else 'first'}")
        self.missing, self.step = missing, step


@dataclass(frozen=True)
class Step:
    """One data step: `loraflow step <name>`, the DAG's task `task_id`, and the function
    `target` ("module:function", imported when the step runs) that takes (config, paths)."""

    name: str
    task_id: str
    target: str

    def function(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


# prepare comes first (it creates the run folder); the variants and the report follow.
DATA_STEPS = (
    Step("download", "download_dataset", "tasks.data:download_dataset"),
    Step("validate", "validate_dataset", "tasks.validate:validate_dataset"),
    Step("tokenize", "tokenize", "tasks.tokenize:tokenize_dataset"),
)


def data_step(name: str) -> Step:
    for step in DATA_STEPS:
        if step.name == name:
            return step
    raise ValueError(
        f"unknown data step {name!r}; expected one of {', '.join(s.name for s in DATA_STEPS)}"
    )
