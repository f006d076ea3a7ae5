"""What a stage returns to the runner, which writes it into the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field



@dataclass
class StageResult:
    outputs: dict[str, str]  # name -> file or folder, relative to the stage folder
    rows: dict[str, int] = field(default_factory=dict)  # rows in and out, by name
    stats: dict = field(default_factory=dict)  # drops by reason, distributions, token-limit hits
